"""Denoising: quality gains and time per 256x256 slice, diffusion prior against the classical baselines.

Needs a trained denoising run (``medsynth run configs/denoise_mri.yaml`` or ``denoise_ct.yaml``): the
model comes from ``<run>/train/model.pt``, the held-out clean scans from ``<run>/prepare``.

    python benchmarks/denoise.py --run runs/denoise_mri --num-images 12 --repeats 3

1. **Quality**, at the model's training resolution: the first ``--num-images`` validation scans get
   seeded noise at each level (the same simulation as the ``denoise`` stage: Rician at sigma = level x
   the foreground 99th percentile for MR; projection-domain low dose for CT), every method denoises
   them with the noise level it estimates itself (``--sigma auto``, what a user gets) or the true one
   (``--sigma oracle``), and PSNR/SSIM (whole image and foreground; data range = clean max - min) and
   the foreground contrast slope (least-squares slope against the clean scan: 1 keeps the contrast,
   < 1 compressed it) are averaged. Printed: each method's mean, its gain over the noisy input, and the
   diffusion prior's margin over the best classical method at each level.
2. **Time per 256x256 slice**: one 256x256 phantom slice at the same noise (the middle level), each
   method timed ``--repeats`` times in this process, alternating methods; the median is printed with
   its ratio to non-local means measured in the same rounds. The diffusion prior runs over windows of
   its training size (MONAI ``SlidingWindowInferer``, Gaussian blending), which is what a 256x256
   scan costs with a model trained on smaller images; ``--fast-overlap`` sets the window overlap of
   the fast mode (Tweedie: one network evaluation per window).

A JSON summary goes to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medsynth.config import load_config
from medsynth.data.phantoms import generate_phantom
from medsynth.denoise.classical import available_methods
from medsynth.denoise.registry import CLASSICAL_METHOD_NAMES
from medsynth.denoise.scan import PriorSettings, denoise_scan
from medsynth.io.volumes import read_nifti
from medsynth.metrics.restoration import foreground, restoration_metrics
from medsynth.models.loading import load_trained_model
from pipelines.denoise import simulate


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=Path, required=True, help="output folder of a denoising pipeline run (prepare + train)"
    )
    parser.add_argument("--levels", type=float, nargs="*", help="noise levels (default: the run's config)")
    parser.add_argument("--num-images", type=int, default=12)
    parser.add_argument("--sigma", choices=("auto", "oracle"), default="auto")
    parser.add_argument("--methods", nargs="*", help="default: diffusion and every installed classical method")
    parser.add_argument(
        "--modes", nargs="*", default=["tweedie", "ddim"], help="diffusion modes to score (tweedie, ddim, ancestral)"
    )
    parser.add_argument(
        "--rician", nargs="*", default=["output"], help="MR: where the prior's Rician correction goes (output, input)"
    )
    parser.add_argument("--steps", type=int, default=10, help="reverse steps of the ddim/ancestral modes")
    parser.add_argument("--samples", type=int, default=1, help="posterior draws averaged (ddim/ancestral)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap for the quality runs")
    parser.add_argument("--fast-overlap", type=float, default=0.25, help="window overlap of the timed fast mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="side of the timed slice")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def method_names(args: argparse.Namespace) -> list[str]:
    classical = [m for m in CLASSICAL_METHOD_NAMES if m in available_methods()]
    names = args.methods or ["diffusion", *classical]
    expanded = []
    for name in names:
        expanded += (
            [
                f"diffusion:{mode}" + ("" if rician == "output" else f":{rician}")
                for mode in args.modes
                for rician in args.rician
            ]
            if name == "diffusion"
            else [name]
        )
    return expanded


def run_method(
    name: str,
    noisy: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str,
    sigma: float | None,
    trained,
    overlap: float,
    args: argparse.Namespace,
) -> np.ndarray:
    method, mode, rician = (name.split(":") + ["", ""])[:3]
    settings = PriorSettings(
        mode=mode or "tweedie",
        steps=args.steps,
        samples=args.samples if mode != "tweedie" else 1,
        seed=0,
        overlap=overlap,
        rician=rician or "output",
    )
    return denoise_scan(
        noisy, affine, method=method, modality=modality, sigma=sigma, trained=trained, settings=settings
    ).image


def quality(args, config, trained, names: list[str]) -> dict:
    prepare = args.run / "prepare"
    cases = json.loads((prepare / "datalist.json").read_text())["validation"][: args.num_images]
    modality, noise = config.modality, config.denoise_noise
    levels = args.levels or config.denoise.noise_levels(noise)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for j, level in enumerate(levels):
        scores: dict[str, list[dict[str, float]]] = {n: [] for n in ["noisy", *names]}
        for i, case in enumerate(cases):
            clean = read_nifti(prepare / case["image"])
            spacing = float(np.sqrt((clean.affine[:3, 0] ** 2).sum()))
            noisy, true_sigma = simulate(
                clean.array, noise, level, seed=2000 + 1000 * j + i, spacing_mm=spacing, photons=config.denoise.photons
            )
            data_range = float(clean.array.max() - clean.array.min())
            mask = foreground(clean.array, modality)
            scores["noisy"].append(restoration_metrics(noisy, clean.array, data_range=data_range, mask=mask))
            for name in names:
                estimate = run_method(
                    name,
                    noisy,
                    clean.affine,
                    modality=modality,
                    sigma=true_sigma if args.sigma == "oracle" else None,
                    trained=trained,
                    overlap=args.overlap,
                    args=args,
                )
                scores[name].append(restoration_metrics(estimate, clean.array, data_range=data_range, mask=mask))
        table[str(level)] = {n: {k: float(np.mean([s[k] for s in v])) for k in v[0]} for n, v in scores.items()}
        print(f"level {level}: done ({len(cases)} images)", file=sys.stderr, flush=True)
    return {"levels": levels, "images": len(cases), "sigma": args.sigma, "table": table}


def timing(args, config, trained, names: list[str], level: float) -> dict:
    """Seconds per 256x256 slice, median over repeats, methods alternating within each round."""
    modality = config.modality
    spacing = trained.data.get("spacing_mm") or [1.0, 1.0]
    phantom = generate_phantom(
        config.data.phantom.kind,
        (args.size, args.size),
        123456,
        **({"noise_std": 0.0} if modality == "mr" else {"noise_std_hu": 0.0}),
    )
    clean = phantom.image.astype(np.float32)
    affine = np.diag([float(spacing[0]), float(spacing[-1]), 1.0, 1.0])
    noisy, _ = simulate(
        clean, config.denoise_noise, level, seed=7, spacing_mm=float(spacing[0]), photons=config.denoise.photons
    )
    timed = ["nlm"] + [n for n in names if n != "nlm" and not n.endswith(":input")] + ["diffusion:fast"]
    seconds: dict[str, list[float]] = {n: [] for n in timed}
    for name in timed:  # warm-up (first-call allocations, thread pools)
        run_method(
            "diffusion:tweedie" if name == "diffusion:fast" else name,
            noisy,
            affine,
            modality=modality,
            sigma=None,
            trained=trained,
            overlap=args.fast_overlap if name == "diffusion:fast" else args.overlap,
            args=args,
        )
    for _ in range(args.repeats):
        for name in timed:
            started = time.perf_counter()
            run_method(
                "diffusion:tweedie" if name == "diffusion:fast" else name,
                noisy,
                affine,
                modality=modality,
                sigma=None,
                trained=trained,
                overlap=args.fast_overlap if name == "diffusion:fast" else args.overlap,
                args=args,
            )
            seconds[name].append(time.perf_counter() - started)
    reference = statistics.median(seconds["nlm"])
    return {
        "shape": [args.size, args.size],
        "level": level,
        "repeats": args.repeats,
        "overlap": args.overlap,
        "fast_overlap": args.fast_overlap,
        "seconds": seconds,
        "median_s": {n: statistics.median(v) for n, v in seconds.items()},
        "ratio_to_nlm": {n: statistics.median(v) / reference for n, v in seconds.items()},
    }


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    config = load_config(args.run / "prepare" / "config.yaml")
    trained = load_trained_model(args.run / "train" / "model.pt", torch.device("cpu"))
    names = method_names(args)
    levels = args.levels or config.denoise.noise_levels(config.denoise_noise)
    result: dict = {
        "run": str(args.run),
        "model_step": trained.step,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if not args.skip_quality:
        result["quality"] = q = quality(args, config, trained, names)
        print(
            f"\nquality ({q['images']} held-out images, sigma {q['sigma']}; PSNR dB whole / foreground, SSIM whole, "
            "contrast slope in the foreground, 1 = kept):"
        )
        for level, rows in q["table"].items():
            classical = [n for n in rows if n not in ("noisy",) and not n.startswith("diffusion")]
            best = max(classical, key=lambda n: rows[n]["psnr"]) if classical else None
            print(f"  level {level}")
            for name, row in rows.items():
                gain = row["psnr"] - rows["noisy"]["psnr"]
                print(
                    f"    {name:18s} {row['psnr']:6.2f} / {row['psnr_fg']:6.2f}   SSIM {row['ssim']:.3f}   "
                    f"slope {row['slope_fg']:.3f}   gain {gain:+5.2f} dB"
                )
            for name in (n for n in rows if n.startswith("diffusion") and best):
                print(
                    f"    {name} - best classical ({best}): {rows[name]['psnr'] - rows[best]['psnr']:+.2f} dB whole, "
                    f"{rows[name]['psnr_fg'] - rows[best]['psnr_fg']:+.2f} dB foreground"
                )
    result["timing"] = t = timing(args, config, trained, names, levels[len(levels) // 2])
    print(
        f"\ntime per {args.size}x{args.size} slice (median of {args.repeats}, {args.threads} threads; "
        "ratio to nlm in the same rounds):"
    )
    for name, seconds in t["median_s"].items():
        label = f"diffusion:tweedie, overlap {args.fast_overlap} (fast mode)" if name == "diffusion:fast" else name
        print(f"  {label:40s} {seconds:7.3f} s   x{t['ratio_to_nlm'][name]:.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
