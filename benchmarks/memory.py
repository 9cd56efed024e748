"""Memory and speed knobs for 3D training: peak memory and step time of each, against the plain run.

Each variant trains the same 3D UNet on the same random volumes for ``--steps`` steps in a fresh
subprocess (so its peak resident memory, ``ru_maxrss``, is its own); the time per step excludes
the first step. Variants: plain, ``train.gradient_checkpointing``, ``model.use_flash_attention``
(with self-attention at the deepest level, as the plain run), ``train.channels_last``.

    python benchmarks/memory.py --size 48 --batch 2 --steps 4

Peak RSS includes the Python/torch baseline (about 0.4 GB), printed separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tempfile, time
import numpy as np, torch
from medsynth.config import Config
from medsynth.runtime import DistContext
from medsynth.training.engine import RunSettings
from medsynth.training.trainer import train_diffusion
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = spec["size"]
config = Config.model_validate({
    "seed": 0, "stages": ["prepare", "train"],
    "data": {
        "source": "phantom", "phantom": {"kind": "body_ct", "shape": [size] * 3}, "spatial_dims": 3,
        "image_size": [size] * 3,
    },
    "model": {
        "channels": spec["channels"], "attention_levels": [False] * (len(spec["channels"]) - 1) + [True],
        "num_res_blocks": 1, "norm_num_groups": 16, "num_head_channels": 32, "use_flash_attention": spec["flash"],
    },
    "train": {
        "batch_size": spec["batch"], "max_steps": spec["steps"], "checkpoint_every": 1000, "val_every": 1000,
        "log_every": 1, "val_images": 2, "gradient_checkpointing": spec["checkpointing"],
        "channels_last": spec["channels_last"],
    },
})
images = np.random.default_rng(0).uniform(-1, 1, (8, 1, size, size, size)).astype(np.float32)
times = []
with tempfile.TemporaryDirectory() as tmp:
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    from pathlib import Path
    run = RunSettings(
        seed=0, work_dir=Path(tmp), dist=ctx, progress=None,
        step_callback=lambda step: times.append(time.perf_counter()),
    )
    train_diffusion(config.model, config.diffusion, config.train, images[:6], images[6:], run)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds_per_step = (times[-1] - times[0]) / (len(times) - 1)
print(json.dumps({"peak_mb": peak / 1024, "baseline_mb": baseline / 1024, "seconds_per_step": seconds_per_step}))
"""

AUTOENCODER_CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from medsynth.config import Config
from medsynth.runtime import DistContext
from medsynth.training.autoencoder import train_autoencoder
from medsynth.training.engine import RunSettings
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = spec["size"]
config = Config.model_validate({
    "seed": 0, "stages": ["prepare", "autoencoder"],
    "data": {
        "source": "phantom", "phantom": {"kind": "body_ct", "shape": [size] * 3}, "spatial_dims": 3,
        "image_size": [size] * 3,
    },
    "autoencoder": {
        "channels": [16, 32, 32], "batch_size": spec["batch"], "max_steps": spec["steps"], "adv_start": 0,
        "disc_channels": 16, "patch_size": spec["patch"], "val_images": 1, "val_every": 1000, "log_every": 1,
        "checkpoint_every": 1000,
    },
})
images = np.random.default_rng(0).uniform(-1, 1, (4, 1, size, size, size)).astype(np.float32)
times = []
with tempfile.TemporaryDirectory() as tmp:
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = RunSettings(
        seed=0, work_dir=Path(tmp), dist=ctx, progress=None,
        step_callback=lambda step: times.append(time.perf_counter()),
    )
    train_autoencoder(config.autoencoder, images[:3], images[3:], run, spatial_dims=config.data.spatial_dims)
print(json.dumps({
    "seconds_per_step": (times[-1] - times[0]) / (len(times) - 1),
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "baseline_mb": baseline / 1024,
}))
"""

VARIANTS = {
    "plain": {},
    "gradient_checkpointing": {"checkpointing": True},
    "flash_attention": {"flash": True},
    "channels_last": {"channels_last": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--channels", type=int, nargs="*", default=[32, 64, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out")
    parser.add_argument(
        "--autoencoder-patch",
        type=int,
        default=None,
        help="instead: the autoencoder (16-32-32, with its discriminator) on whole --size^3 volumes vs random crops "
        "of this side",
    )
    args = parser.parse_args()
    if args.autoencoder_patch:
        autoencoder_patches(args)
        return
    results = {}
    for name in args.variants:
        spec = {
            "size": args.size,
            "batch": args.batch,
            "steps": args.steps,
            "channels": args.channels,
            "threads": args.threads,
            "checkpointing": False,
            "flash": False,
            "channels_last": False,
            **VARIANTS[name],
        }
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"{name}: failed\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    plain = results.get("plain")
    print(f"\n3D UNet {args.channels}, {args.size}^3, batch {args.batch}, {args.steps} steps, {args.threads} threads")
    print("| variant | peak RSS MB | above baseline MB | s/step | memory vs plain | time vs plain |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        above = r["peak_mb"] - r["baseline_mb"]
        rel = (
            ""
            if plain is None
            else f"{above / (plain['peak_mb'] - plain['baseline_mb']):.2f} | "
            f"{r['seconds_per_step'] / plain['seconds_per_step']:.2f}"
        )
        print(f"| {name} | {r['peak_mb']:.0f} | {above:.0f} | {r['seconds_per_step']:.2f} | {rel} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


def autoencoder_patches(args: argparse.Namespace) -> None:
    """Patch-based training: the autoencoder's peak memory and step time on whole volumes vs crops. The
    peak includes the end of training (scale factor and validation encode whole volumes)."""
    results = {}
    for name, patch in (("whole", None), (f"patch {args.autoencoder_patch}", [args.autoencoder_patch] * 3)):
        spec = {"size": args.size, "batch": args.batch, "steps": args.steps, "threads": args.threads, "patch": patch}
        done = subprocess.run(
            [sys.executable, "-c", AUTOENCODER_CHILD, json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"{name}: failed\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    whole = results["whole"]
    print(
        f"\nAutoencoderKL 16-32-32 + PatchDiscriminator, {args.size}^3 volumes, batch {args.batch}, "
        f"{args.steps} steps, {args.threads} threads"
    )
    print("| training inputs | peak RSS MB | above baseline MB | s/step | memory vs whole | time vs whole |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        above = r["peak_mb"] - r["baseline_mb"]
        print(
            f"| {name} | {r['peak_mb']:.0f} | {above:.0f} | {r['seconds_per_step']:.2f} | "
            f"{above / (whole['peak_mb'] - whole['baseline_mb']):.2f} | "
            f"{r['seconds_per_step'] / whole['seconds_per_step']:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
