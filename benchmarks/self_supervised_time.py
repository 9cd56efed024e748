"""Time of ``medsynth denoise INPUT OUTPUT --self-supervised`` on a 256x256x32 magnitude volume (the issue's
size target: fit and denoise in <= 10 minutes on 2 cores), fit and denoising timed apart.

Timing does not depend on the anatomy, so the volume is the project's brain phantom (256x256x32, 1 mm,
Rician noise at 5 % of its foreground's 99th percentile); its quality numbers are not evidence (see
``benchmarks/denoise_real.py`` for real scans). The command is the real CLI, run in this process:

    python benchmarks/self_supervised_time.py [--steps N] [--draws K] [--set key.sub=value ...]

``--steps`` / ``--set`` change the recipe (``configs/denoise_self_supervised.yaml``), written to a temporary
copy that ``--config`` points at; prints the seconds of the fit (the CLI's own fitting function, timed) and
of the whole command, the peak resident memory, and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

import medsynth.self_supervised as self_supervised
from medsynth.cli import main as medsynth
from medsynth.data.phantoms import generate_phantom
from medsynth.data.transforms import foreground_mask
from medsynth.noise.models import rician_noise
from medsynth.self_supervised import default_recipe

FIT_SECONDS: list[float] = []


def _timed_fit(*args, **kwargs):
    """The CLI's own fit, timed (the module attribute the CLI path calls)."""
    started = time.perf_counter()
    try:
        return _FIT(*args, **kwargs)
    finally:
        FIT_SECONDS.append(time.perf_counter() - started)


_FIT = self_supervised.fit_self_supervised
self_supervised.fit_self_supervised = _timed_fit

SHAPE = (256, 256, 32)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], metavar="key.sub=value")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def recipe(path: Path, steps: int | None, overrides: list[str]) -> Path:
    config = yaml.safe_load(default_recipe().read_text())
    changes = list(overrides) + ([f"train.max_steps={steps}"] if steps else [])
    for change in changes:
        key, value = change.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> int:
    args = parse()
    clean = generate_phantom("brain_mri", SHAPE, 0, noise_std=0.0).image.astype(np.float32)
    sigma = 0.05 * float(np.percentile(clean[foreground_mask(clean)], 99.0))
    noisy = rician_noise(clean, sigma, seed=0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        nib.save(nib.Nifti1Image(noisy, np.eye(4)), work / "noisy.nii.gz")
        config = recipe(work / "recipe.yaml", args.steps, args.set)
        started = time.perf_counter()
        code = medsynth(
            [
                "denoise",
                str(work / "noisy.nii.gz"),
                str(work / "out.nii.gz"),
                "--self-supervised",
                "--modality",
                "mr",
                "--config",
                str(config),
                "--draws",
                str(args.draws),
            ]
        )
        total = time.perf_counter() - started
        if code != 0:
            return code
        assert (work / "out_prior.pt").is_file() and (work / "out.nii.gz").is_file()
        fit = sum(FIT_SECONDS)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "shape": list(SHAPE),
        "steps": args.steps,
        "draws": args.draws,
        "overrides": args.set,
        "total_s": round(total, 1),
        "fit_s": round(fit, 1),
        "denoise_s": round(total - fit, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
