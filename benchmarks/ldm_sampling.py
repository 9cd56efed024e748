"""Peak memory and time of sampling one large volume with a latent diffusion model (CPU).

Each variant samples one volume in a fresh subprocess (its own ``ru_maxrss``): latents with the
configured sampler, then the autoencoder's decode, whole or with a sliding window. The networks are
those of ``--config`` (default ``configs/ldm3d.yaml``: 128^3 volumes, 32^3 x 3 latents); with
``--model`` a trained ``model.pt`` is used instead. Memory and time do not depend on the weights, so
without ``--model`` the networks keep their initial weights.

    python benchmarks/ldm_sampling.py --steps 20 --variants whole window16 window8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from medsynth.config import load_config
from medsynth.models.autoencoder import TrainedAutoencoder, autoencoder_kwargs, build_autoencoder
from medsynth.models.loading import TrainedModel, load_trained_model
from medsynth.models.unet import build_unet
from medsynth.synthesis import synthesise
config = load_config(spec["config"])
if spec["model"]:
    trained = load_trained_model(spec["model"])
else:
    torch.manual_seed(0)
    dims, ae_cfg = config.data.spatial_dims, config.autoencoder
    ae = TrainedAutoencoder(
        build_autoencoder(ae_cfg, dims).eval().requires_grad_(False), dims, 1.0, ae_cfg.downsample,
        ae_cfg.latent_channels, list(config.data.image_size), {"modality": "ct", "low": -1000.0, "high": 1000.0}, 0,
        None, autoencoder_kwargs(ae_cfg),
    )
    channels = ae_cfg.latent_channels
    unet = build_unet(config.model, spatial_dims=dims, in_channels=channels, out_channels=channels)
    unet = unet.eval().requires_grad_(False)
    latent = [s // ae_cfg.downsample for s in config.data.image_size]
    trained = TrainedModel(unet, config.diffusion, dims, latent, ae.intensity, 0, Path("untrained"), {}, ae)
started = time.perf_counter()
images, _ = synthesise(
    trained, sampler=spec["sampler"], steps=spec["steps"], seeds=[0], batch_size=1, device=torch.device("cpu"),
    decode_roi=None if spec["roi"] is None else [spec["roi"]] * trained.spatial_dims, decode_overlap=spec["overlap"],
)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(
    {"peak_mb": peak / 1024, "baseline_mb": baseline / 1024, "seconds": seconds, "shape": list(images.shape)}
))
"""

VARIANTS = {"whole": None, "window16": 16, "window8": 8}  # latent window side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ldm3d.yaml")
    parser.add_argument("--model", help="a trained latent model.pt (default: the config's networks, untrained)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {}
    for name in args.variants:
        spec = {
            "config": args.config,
            "model": args.model,
            "sampler": args.sampler,
            "steps": args.steps,
            "threads": args.threads,
            "roi": VARIANTS[name],
            "overlap": args.overlap,
        }
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"{name}: failed\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    print(
        f"\n{args.config}{' + ' + args.model if args.model else ' (untrained weights)'}: one sample, "
        f"{args.sampler} {args.steps} steps, "
        f"{args.threads} threads"
    )
    print("| decode | output | peak RSS MB | above baseline MB | seconds |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {'x'.join(map(str, r['shape'][2:]))} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] - r['baseline_mb']:.0f} | {r['seconds']:.1f} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
