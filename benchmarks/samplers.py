"""Sampler comparison: sample quality against the number of network evaluations, for every sampler.

Needs a trained run (``medsynth run configs/quickstart.yaml``): the model from ``<run>/train/model.pt``,
held-out real images from ``<run>/prepare/cache``.

    python benchmarks/samplers.py --run runs/quickstart --nfe 5 10 20 50 --num-samples 64

Every sampler draws the same seeds at each budget of network evaluations (NFE; counted by wrapping
the network, not assumed): one-evaluation-per-step samplers (ddpm, ddim, euler, dpmpp_2m) get NFE
steps, two-evaluation ones (heun, pc) (NFE + 1) // 2 steps. The reference is 1000-step ancestral
DDPM. Quality is what the evaluate stage measures against the held-out images (normalised
intensities): the whole-image intensity distance (``hist_w1/all``, the headline), the per-class
intensity distance, MMD, the MS-SSIM diversity gap; plus the background noise (std of the 4x4
corner patches, exactly -1 in the data). The per-class distance was the first headline; it scored
5-step DDPM (visibly noisy, diversity gap 0.24) as well as the 1000-step reference, so it is reported
but does not rank. Printed as a table with each headline's ratio to the
reference; ``--out`` writes JSON and ``--plot`` a PNG of quality against NFE; ``--tracking-uri`` logs all of
it as one MLflow run, each metric with step = NFE so that the MLflow UI charts quality against
network evaluations per sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medsynth.data.prepare import load_summary
from medsynth.diffusion.registry import samplers_for
from medsynth.diffusion.sampling import generate
from medsynth.diffusion.schedulers import build_sampling_scheduler
from medsynth.metrics.fidelity import evaluate_fidelity
from medsynth.models.loading import load_trained_model

TWO_EVALUATIONS = {"heun", "pc"}
HEADLINE = "hist_w1/all"  # see the docstring: the per-class distance did not separate samplers


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--samplers", nargs="*", default=list(samplers_for("ddpm")), help="default: every DDPM sampler")
    parser.add_argument("--nfe", type=int, nargs="*", default=[5, 10, 20, 50])
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument(
        "--tracking-uri",
        help="log to MLflow: metrics samplers/<sampler>/<metric> with step = NFE (MLflow plots "
        "them against NFE), the table, the plot; default: no logging",
    )
    parser.add_argument("--experiment", default="medsynth-samplers")
    return parser.parse_args()


class Counted(torch.nn.Module):
    """The network, counting evaluations (per batch call)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.network(x, timesteps=timesteps)


def quality(run: Path, trained, sampler: str, steps: int, args, real: torch.Tensor, labels, names) -> dict:
    diffusion = trained.diffusion
    schedule = build_sampling_scheduler(diffusion, sampler=sampler, steps=steps, spatial_dims=trained.spatial_dims)
    if trained.num_classes is not None or trained.is_latent:
        raise SystemExit(
            f"{trained.path}: this benchmark compares unconditional pixel-space models (use benchmarks/guidance.py for "
            "class-conditional ones)"
        )
    counted = Counted(trained.network)
    started = time.perf_counter()
    fake = generate(
        counted,
        schedule,
        sampler=sampler,
        image_shape=(trained.network.in_channels, *trained.image_size),
        seeds=list(range(args.seed, args.seed + args.num_samples)),
        batch_size=args.batch_size,
        device=torch.device("cpu"),
    )
    seconds = time.perf_counter() - started
    fake = fake.clamp(-1, 1)
    batches = (args.num_samples + args.batch_size - 1) // args.batch_size
    metrics = evaluate_fidelity(real, fake, spatial_dims=trained.spatial_dims, real_labels=labels, class_names=names)
    corners = torch.cat([fake[..., :4, :4].flatten(1), fake[..., -4:, -4:].flatten(1)], dim=1)
    return {
        "sampler": sampler,
        "steps": steps,
        "nfe": counted.calls // batches,
        "seconds": seconds,
        "background_std": float(corners.std()),
        **{k: float(v) for k, v in metrics.items()},
    }


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    trained = load_trained_model(args.run / "train" / "model.pt", torch.device("cpu"))
    cache = args.run / "prepare" / "cache"
    summary = load_summary(cache)
    real = torch.from_numpy(np.load(cache / "val_images.npy", allow_pickle=False))
    labels_path = cache / "val_labels.npy"
    labels = (
        torch.from_numpy(np.load(labels_path, allow_pickle=False).astype(np.int64)) if labels_path.exists() else None
    )
    names = {int(k): v for k, v in summary.get("label_names", {}).items()} or None

    rows = [quality(args.run, trained, "ddpm", args.reference_steps, args, real, labels, names)]
    print(
        f"reference ddpm {args.reference_steps}: {HEADLINE} {rows[0][HEADLINE]:.4f} ({rows[0]['seconds']:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    for sampler in args.samplers:
        for nfe in args.nfe:
            steps = (nfe + 1) // 2 if sampler in TWO_EVALUATIONS else nfe
            rows.append(quality(args.run, trained, sampler, steps, args, real, labels, names))
            print(f"{sampler} nfe {rows[-1]['nfe']}: {HEADLINE} {rows[-1][HEADLINE]:.4f}", file=sys.stderr, flush=True)

    reference = rows[0]
    keys = (HEADLINE, "hist_w1/mean_class", "mmd", "diversity_gap", "background_std")
    print(
        f"\n{args.num_samples} samples per row vs {len(real)} held-out images; "
        f"ratio = {HEADLINE} / reference (lower is better)"
    )
    print("| sampler | steps | NFE | " + " | ".join(keys) + " | ratio | seconds |")
    print("|---" * (len(keys) + 5) + "|")
    for row in rows:
        ratio = row[HEADLINE] / reference[HEADLINE]
        cells = " | ".join(f"{row[k]:.4f}" for k in keys)
        print(f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {cells} | {ratio:.2f} | {row['seconds']:.1f} |")
    within = [r for r in rows[1:] if r["nfe"] <= 20 and r[HEADLINE] <= 1.05 * reference[HEADLINE]]
    listed = ", ".join(f"{r['sampler']} ({r['nfe']})" for r in within) or "none"
    print(f"\nwithin 5 % of the reference at <= 20 evaluations: {listed}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"reference_steps": args.reference_steps, "num_samples": args.num_samples, "rows": rows}, indent=1
            )
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for sampler in args.samplers:
            mine = [r for r in rows[1:] if r["sampler"] == sampler]
            ax.plot([r["nfe"] for r in mine], [r[HEADLINE] for r in mine], marker="o", label=sampler)
        ax.axhline(reference[HEADLINE], color="k", ls="--", label=f"ddpm {args.reference_steps}")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations")
        ax.set_ylabel(HEADLINE + " (lower is better)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if args.tracking_uri:
        print(
            f"MLflow run {log_to_mlflow(args, rows, args.run / 'train' / 'model.pt')} in experiment {args.experiment}"
        )


def log_to_mlflow(args: argparse.Namespace, rows: list[dict], model_file: Path) -> str:
    import tempfile

    import mlflow

    from medsynth.io.atomic import file_digest

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=f"samplers {args.run.name}") as run:
        mlflow.log_params(
            {
                "run_dir": str(args.run),
                "model_sha256": file_digest(model_file),
                "num_samples": args.num_samples,
                "seed": args.seed,
                "reference_steps": args.reference_steps,
                "headline": HEADLINE,
            }
        )
        for row in rows:
            name = "reference" if row is rows[0] else row["sampler"]
            for key in (HEADLINE, "hist_w1/mean_class", "mmd", "diversity_gap", "background_std", "seconds"):
                mlflow.log_metric(f"samplers/{name}/{key}", row[key], step=row["nfe"])
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "sampler_table.json"
            table.write_text(json.dumps(rows, indent=1))
            mlflow.log_artifact(str(table))
        if args.plot and args.plot.exists():
            mlflow.log_artifact(str(args.plot))
        return run.info.run_id


if __name__ == "__main__":
    main()
