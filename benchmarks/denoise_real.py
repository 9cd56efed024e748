"""Denoising real MRI: the native-resolution prior (clean-trained), the self-supervised prior (noisy scan
only) and BM3D / NLM with Rician correction, scored over the whole image and inside the anatomy.

The real scans ship offline in the ``dipy`` wheel (``pip install -e ".[real]"``; nothing is downloaded):

- ``t1``: ``t1_coronal_slice.npy``, a 256x256 T1 coronal slice (skull-stripped); the prior trains on its
  upper rows (y >= 132), the test is its lower rows (y < 124), 8 rows apart;
- ``b0``: ``S0_10slices.nii.gz``, a 128x128x10 b0 volume (2 mm in plane); trains on slices 0-5, tests on 8-9;
- ``aniso``: ``aniso_vox.nii.gz``, a 58x58x24 volume (4 x 4 x 5 mm); trains on slices 0-14, tests on 18-23.

On every test part: Rician noise of ``level`` x the foreground's 99.5th percentile (seeded), the noise
level estimated from the image by each method itself (what a user gets). Scores against the clean part:
PSNR / SSIM whole image and inside the foreground (the clean part's head, 10 % of its 99th percentile),
and the contrast slope (denoised vs clean intensities inside the foreground, 1 = contrast kept), with
data range = the foreground's 99.5th percentile. Methods:

- ``prior``: ``configs/denoise_mri_native.yaml``'s recipe (or ``--config``) trained on the training part
  (clean) with :func:`medsynth.training.scan_prior.fit_scan_prior`, then the same code path as
  ``medsynth denoise --checkpoint`` (:func:`medsynth.denoise.scan.denoise_scan`);
- ``prior_ensemble``: the same prior with ``--ensemble`` (mirror images and, for priors trained on turned
  crops, 90-degree turns averaged);
- ``self_supervised``: ``medsynth denoise --self-supervised``'s path on the noisy test part alone
  (:func:`medsynth.denoise.self_supervised.self_supervised_denoise`), one fit per level;
- ``bm3d`` and ``nlm`` (+ Rician bias correction), ``noisy``.

    python benchmarks/denoise_real.py --data t1 b0 --levels 0.05 0.1 --out benchmarks/results/denoise_real.json

``--steps`` / ``--ss-steps`` shorten the fits (the recipe's ``train.max_steps`` otherwise);
``--figure PATH`` writes noisy | BM3D | prior | self-supervised | clean for the first data set and level.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.config import load_config
from medsynth.data.transforms import foreground_mask, intensity_for
from medsynth.denoise.classical import available_methods
from medsynth.denoise.scan import PriorSettings, denoise_scan
from medsynth.metrics.restoration import restoration_metrics
from medsynth.models.loading import load_trained_model
from medsynth.noise.models import rician_noise
from medsynth.training.scan_prior import fit_scan_prior

ROOT = Path(__file__).resolve().parents[1]


def dipy_files() -> Path:
    """The folder of real scans inside the installed ``dipy`` wheel."""
    spec = importlib.util.find_spec("dipy")
    if spec is None or spec.origin is None:
        sys.exit('error: the real scans come with dipy: pip install -e ".[real]"')
    return Path(spec.origin).parent / "data" / "files"


def real_data(name: str) -> dict:
    """``{"train": [(array, affine)], "test": [(array, affine)]}`` of one real data set (see the docstring)."""
    files = dipy_files()
    if name == "t1":
        image = np.load(files / "t1_coronal_slice.npy").astype(np.float32) * 1000.0  # [0, 1] -> scanner-like units
        affine = np.eye(4)
        return {"train": [(image[:, 132:, None], affine)], "test": [(image[:, :124], affine)]}
    path = {"b0": "S0_10slices.nii.gz", "aniso": "aniso_vox.nii.gz"}[name]
    scan = nib.load(files / path)
    volume = np.asarray(scan.dataobj, dtype=np.float32)
    volume = volume[..., 0] if volume.ndim == 4 else volume
    affine = scan.affine
    train, test = {"b0": (slice(0, 6), slice(8, 10)), "aniso": (slice(0, 15), slice(18, 24))}[name]
    return {"train": [(volume[..., train], affine)], "test": [(volume[..., test], affine)]}


def scores(estimate: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    mask = foreground_mask(clean)
    data_range = float(np.percentile(clean[mask], 99.5))
    return restoration_metrics(estimate, clean, data_range=data_range, mask=mask)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="*", default=["t1", "b0"], choices=["t1", "b0", "aniso"])
    parser.add_argument("--levels", type=float, nargs="*", default=[0.025, 0.05, 0.1])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "denoise_mri_native.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="key.sub=value", help="overrides of the prior recipe")
    parser.add_argument("--steps", type=int, help="training steps of the clean prior (default: the recipe's)")
    parser.add_argument("--ss-steps", type=int, help="training steps of each self-supervised fit (default: its own)")
    parser.add_argument("--methods", nargs="*", default=["prior", "self_supervised", "bm3d", "nlm"])
    parser.add_argument("--mode", default="tweedie", help="diffusion mode of the clean prior")
    parser.add_argument(
        "--rician", default="output", choices=["output", "input"], help="where the prior removes the Rician floor"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path)
    return parser.parse_args()


def main() -> int:
    args = parse()
    overrides = list(args.set) + ([f"train.max_steps={args.steps}"] if args.steps else [])
    config = load_config(args.config, overrides + ["data.folder=."])
    results: dict = {"config": str(args.config), "overrides": overrides, "levels": args.levels, "data": {}}
    pictures = {}
    for name in args.data:
        data = real_data(name)
        timings = {}
        trained = None
        with tempfile.TemporaryDirectory() as work:
            if {"prior", "prior_ensemble"} & set(args.methods):
                started = time.perf_counter()
                intensities = [intensity_for(a, config.data, "mr") for a, _ in data["train"]]
                fit = fit_scan_prior(data["train"], intensities, config, Path(work), modality="mr", progress=name)
                timings["prior_fit_s"] = time.perf_counter() - started
                trained = load_trained_model(fit.model_path)
            rows = {}
            for j, level in enumerate(args.levels):
                clean, affine = data["test"][0]
                sigma = level * float(np.percentile(clean[foreground_mask(clean)], 99.5))
                noisy = rician_noise(clean, sigma, seed=args.seed + j)
                estimates = {"noisy": noisy}
                for method in args.methods:
                    started = time.perf_counter()
                    if method in ("prior", "prior_ensemble"):
                        settings = PriorSettings(mode=args.mode, rician=args.rician, ensemble=method != "prior")
                        estimates[method] = denoise_scan(
                            noisy, affine, method="diffusion", modality="mr", trained=trained, settings=settings
                        ).image
                    elif method == "self_supervised":
                        from medsynth.denoise.self_supervised import self_supervised_denoise

                        with tempfile.TemporaryDirectory() as ss_work:
                            estimates[method] = self_supervised_denoise(
                                noisy,
                                affine,
                                modality="mr",
                                work_dir=Path(ss_work),
                                max_steps=args.ss_steps,
                                progress=None,
                            ).image
                    elif method in available_methods():
                        estimates[method] = denoise_scan(noisy, affine, method=method, modality="mr").image
                    else:
                        continue
                    timings[f"{method}_{level}_s"] = time.perf_counter() - started
                rows[str(level)] = {m: scores(e, clean) for m, e in estimates.items()}
                if name == args.data[0] and j == 0:
                    pictures = {"clean": clean, **estimates}
                for m, r in rows[str(level)].items():
                    print(
                        f"{name} {level:5.3f} {m:16s} PSNR {r['psnr']:6.2f} / fg {r['psnr_fg']:6.2f}   "
                        f"SSIM {r['ssim']:.3f} / fg {r['ssim_fg']:.3f}   slope {r.get('slope_fg', float('nan')):.3f}",
                        flush=True,
                    )
        results["data"][name] = {"scores": rows, "seconds": timings}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if args.figure and pictures:
        figure(pictures, args.figure)
    return 0


def figure(pictures: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("noisy", "bm3d", "prior", "prior_ensemble", "self_supervised", "clean") if n in pictures]
    clean = pictures["clean"]
    top = float(np.percentile(clean[foreground_mask(clean)], 99.5))
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        image = pictures[name]
        image = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
        ax.imshow(np.rot90(image), cmap="gray", vmin=0, vmax=top)
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
