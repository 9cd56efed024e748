"""Denoising real MRI: the native-resolution prior (clean-trained), the self-supervised prior (noisy scan
only) and BM3D / NLM with Rician correction, scored over the whole image and inside the anatomy.

The real scans ship offline in the ``dipy`` wheel (``pip install -e ".[real]"``; nothing is downloaded):

- ``t1``: ``t1_coronal_slice.npy``, a 256x256 T1 coronal slice (skull-stripped); the prior trains on its
  upper rows (y >= 132), the test is its lower rows (y < 124), 8 rows apart;
- ``b0``: ``S0_10slices.nii.gz``, a 128x128x10 b0 volume (2 mm in plane); trains on slices 0-5, tests on 8-9;
- ``aniso``: ``aniso_vox.nii.gz``, a 58x58x24 volume (4 x 4 x 5 mm); trains on slices 0-14, tests on 18-23;
- ``aniso_ap``: the same volume split across y (trains on y < 26, tests on y >= 32, all 24 slices): room for
  3D crops, for the 3D prior against the slice-wise 2D one (``--set data.spatial_dims=3 ...``);
- ``ct``: pydicom's ``J2K_pixelrep_mismatch.dcm``, a 512x512 head CT (0.43 mm); trains on rows >= 272, tests
  on rows < 240; low dose simulated on the whole slice (``--doses``, projection domain), scored inside the
  body (``configs/denoise_ct_native.yaml`` or ``--ct-config``);
- ``piesno``: ``test_piesno.nii.gz``, a real noisy 96x96x14 DWI volume with no clean reference: the
  self-supervised prior and BM3D are reported by the noise level estimated before and after, the residual's
  std over that level and its structure (correlation with the estimate, between neighbours) and a picture.

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
  (:func:`medsynth.self_supervised.fit_self_supervised`, then ``denoise_scan``), one fit per level;
  ``self_supervised_ensemble``: the same fit with ``--ensemble``;
- ``bm3d`` and ``nlm`` (+ Rician bias correction), ``noisy``.

    python benchmarks/denoise_real.py --data t1 b0 --levels 0.05 0.1 --out benchmarks/results/denoise_real.json

``--steps`` / ``--ss-steps`` shorten the fits (the recipe's ``train.max_steps`` otherwise);
``--figure PATH`` writes noisy | BM3D | prior | self-supervised | clean for the first data set and level.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.config import load_config
from medsynth.data.transforms import foreground_mask, intensity_for, scan_foreground
from medsynth.denoise.classical import available_methods
from medsynth.denoise.scan import PriorSettings, denoise_scan, estimate_noise
from medsynth.metrics.restoration import restoration_metrics
from medsynth.models.loading import TrainedModel, load_trained_model
from medsynth.noise.models import low_dose_ct, rician_noise
from medsynth.training.scan_prior import fit_scan_prior

ROOT = Path(__file__).resolve().parents[1]


def dipy_files() -> Path:
    """The folder of real scans inside the installed ``dipy`` wheel."""
    spec = importlib.util.find_spec("dipy")
    if spec is None or spec.origin is None:
        sys.exit('error: the real scans come with dipy: pip install -e ".[real]"')
    return Path(spec.origin).parent / "data" / "files"


CT_FILE = "J2K_pixelrep_mismatch.dcm"  # pydicom's test data: a 512x512 head CT (lossless JPEG 2000), 0.43 mm


def real_data(name: str) -> dict:
    """``{"train": [(array, affine)], "test": [(array, affine)], "modality": ...}`` of one real data set (see
    the docstring); ``ct`` also has ``"whole"`` and ``"test_region"`` (noise is simulated on the whole slice)."""
    files = dipy_files()
    if name == "t1":
        image = np.load(files / "t1_coronal_slice.npy").astype(np.float32) * 1000.0  # [0, 1] -> scanner-like units
        affine = np.eye(4)
        return {"train": [(image[:, 132:, None], affine)], "test": [(image[:, :124], affine)], "modality": "mr"}
    if name == "ct":
        import pydicom
        from pydicom.data import get_testdata_file

        ds = pydicom.dcmread(get_testdata_file(CT_FILE))
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        spacing = [float(v) for v in ds.PixelSpacing]
        affine = np.diag([spacing[0], spacing[1], 1.0, 1.0])
        return {
            "train": [(hu[272:, :, None], affine)],  # the posterior part of the head
            "test": [(hu[:240], affine)],  # the anterior part (orbits, sinuses), 32 rows away
            "whole": hu,
            "test_region": (slice(0, 240), slice(None)),
            "spacing_mm": spacing[0],
            "modality": "ct",
        }
    if name == "piesno":  # a real noisy DWI volume: no clean reference
        scan = nib.load(files / "test_piesno.nii.gz")
        return {"noisy": (np.asarray(scan.dataobj, dtype=np.float32), scan.affine), "modality": "mr"}
    path = {"b0": "S0_10slices.nii.gz", "aniso": "aniso_vox.nii.gz", "aniso_ap": "aniso_vox.nii.gz"}[name]
    scan = nib.load(files / path)
    volume = np.asarray(scan.dataobj, dtype=np.float32)
    volume = volume[..., 0] if volume.ndim == 4 else volume
    affine = scan.affine
    if name == "aniso_ap":  # split across y, every slice kept: room for 3D crops (>= 16 voxels a side)
        return {"train": [(volume[:, :26], affine)], "test": [(volume[:, 32:], affine)], "modality": "mr"}
    train, test = {"b0": (slice(0, 6), slice(8, 10)), "aniso": (slice(0, 15), slice(18, 24))}[name]
    return {"train": [(volume[..., train], affine)], "test": [(volume[..., test], affine)], "modality": "mr"}


def noisy_version(data: dict, level: float, seed: int, photons: float = 2.0e5) -> np.ndarray:
    """MR: Rician noise of ``level`` x the clean test part's foreground 99.5th percentile. CT: the whole slice at
    ``level`` of full dose (projection domain, Poisson + electronic noise, FBP), then the test part."""
    clean, _ = data["test"][0]
    if data["modality"] == "ct":
        whole = low_dose_ct(
            data["whole"], dose_fraction=level, seed=seed, spacing_mm=data["spacing_mm"], photons=photons
        )
        return whole[data["test_region"]]
    sigma = level * float(np.percentile(clean[foreground_mask(clean)], 99.5))
    return rician_noise(clean, sigma, seed=seed)


def scores(estimate: np.ndarray, clean: np.ndarray, modality: str = "mr") -> dict[str, float]:
    """MR: data range the foreground's 99.5th percentile. CT: inside the body (above -500 HU), data range the
    clean part's max - min (as ``evaluate``), plus the RMSE inside the body in HU."""
    mask = scan_foreground(clean, modality)
    if modality == "ct":
        out = restoration_metrics(estimate, clean, data_range=float(clean.max() - clean.min()), mask=mask)
        return out | {"rmse_fg_hu": float(np.sqrt(np.mean((estimate - clean)[mask] ** 2)))}
    data_range = float(np.percentile(clean[mask], 99.5))
    return restoration_metrics(estimate, clean, data_range=data_range, mask=mask)


def no_reference(noisy: np.ndarray, estimate: np.ndarray, modality: str) -> dict[str, float]:
    """What can be said without a clean scan: the noise level estimated before and the residual's
    (``noisy - estimate``) std inside the foreground relative to it (1 = as much taken as the noise holds),
    and the residual's structure: its correlation with the estimate and the correlation of neighbouring
    residual voxels (both 0 for pure white noise; anatomy in the residual raises them)."""
    sigma = estimate_noise(noisy, modality)
    mask = scan_foreground(estimate, modality)
    residual = (noisy - estimate).astype(np.float64)
    inside = residual[mask]
    neighbour = np.corrcoef(residual[1:][mask[1:] & mask[:-1]], residual[:-1][mask[1:] & mask[:-1]])[0, 1]
    return {
        "sigma_estimated": sigma,
        "residual_std_over_sigma": float(inside.std() / sigma),
        "residual_vs_estimate_corr": float(np.corrcoef(inside, estimate[mask])[0, 1]),
        "residual_neighbour_corr": float(neighbour),
        "sigma_of_estimate": estimate_noise(estimate, modality),
    }


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", nargs="*", default=["t1", "b0"], choices=["t1", "b0", "aniso", "aniso_ap", "ct", "piesno"]
    )
    parser.add_argument("--levels", type=float, nargs="*", default=[0.025, 0.05, 0.1], help="MR: Rician noise levels")
    parser.add_argument("--doses", type=float, nargs="*", default=[0.25, 0.1], help="CT: dose fractions")
    parser.add_argument("--ct-config", type=Path, default=ROOT / "configs" / "denoise_ct_native.yaml")
    parser.add_argument("--ss-config", type=Path, help="the self-supervised recipe (default: its own)")
    parser.add_argument("--ss-set", nargs="*", default=[], metavar="key.sub=value", help="overrides of that recipe")
    parser.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=[1.0],
        help="self-supervised: added noise / the scan's; several values: each scored on the same fit (method@alpha)",
    )
    parser.add_argument("--draws", type=int, default=8, help="self-supervised: estimates averaged")
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
    parser.add_argument(
        "--prior", type=Path, help="a folder: the clean prior of each data set kept there as NAME.pt, reused if present"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--figure", type=Path)
    return parser.parse_args()


def self_supervised(noisy: np.ndarray, affine: np.ndarray, modality: str, args: argparse.Namespace) -> TrainedModel:
    """``medsynth denoise --self-supervised``'s fit on ``noisy`` alone (its own recipe, or ``--ss-config``)."""
    from medsynth.self_supervised import default_recipe, fit_self_supervised

    extra = list(args.ss_set) + ([f"train.max_steps={args.ss_steps}"] if args.ss_steps else [])
    recipe = load_config(args.ss_config or default_recipe(), extra + ["data.folder=.", f"data.modality={modality}"])
    with tempfile.TemporaryDirectory() as work:  # the fitted network stays in memory
        return fit_self_supervised([(noisy, affine)], recipe, Path(work), modality=modality, progress=None)


def denoised(
    method: str, noisy: np.ndarray, affine: np.ndarray, modality: str, trained, args, fitted: dict
) -> np.ndarray | None:
    """One method's estimate; ``fitted`` keeps the self-supervised prior of this noisy scan for its two uses."""
    if method in ("prior", "prior_ensemble"):
        settings = PriorSettings(mode=args.mode, rician=args.rician, ensemble=method != "prior")
        return denoise_scan(
            noisy, affine, method="diffusion", modality=modality, trained=trained, settings=settings
        ).image
    if method.split("@")[0] in ("self_supervised", "self_supervised_ensemble"):
        if "prior" not in fitted:
            fitted["prior"] = self_supervised(noisy, affine, modality, args)
        base, _, alpha = method.partition("@")
        settings = PriorSettings(
            alpha=float(alpha or args.alpha[0]), draws=args.draws, seed=args.seed, ensemble=base.endswith("ensemble")
        )
        return denoise_scan(
            noisy, affine, method="self_supervised", modality=modality, trained=fitted["prior"], settings=settings
        ).image
    if method in available_methods():
        return denoise_scan(noisy, affine, method=method, modality=modality).image
    return None


def run_methods(methods, noisy, affine, modality, trained, args, timings: dict, suffix: str) -> dict:
    """Every method's estimate of ``noisy`` (unknown names skipped), each timed into ``timings``."""
    estimates, fitted = {}, {}
    for method in methods:
        started = time.perf_counter()
        estimate = denoised(method, noisy, affine, modality, trained, args, fitted)
        if estimate is not None:
            timings[f"{method}{suffix}_s"] = time.perf_counter() - started
            estimates[method] = estimate
    return estimates


def main() -> int:
    args = parse()
    if len(args.alpha) > 1:  # every self-supervised method once per alpha, on the same fit
        args.methods = [
            f"{m}@{a:g}" if m.startswith("self_supervised") else m for m in args.methods for a in args.alpha
        ]
        args.methods = list(dict.fromkeys(args.methods))
    overrides = list(args.set) + ([f"train.max_steps={args.steps}"] if args.steps else [])
    results: dict = {"config": str(args.config), "overrides": overrides, "levels": args.levels, "data": {}}
    pictures = {}
    for name in args.data:
        data = real_data(name)
        modality = data["modality"]
        timings: dict[str, float] = {}
        if "noisy" in data:  # a real noisy scan: no reference, no clean-trained prior
            noisy, affine = data["noisy"]
            rows = {"as_acquired": {}}
            methods = [m for m in args.methods if m not in ("prior", "prior_ensemble")]
            estimates = {"noisy": noisy} | run_methods(methods, noisy, affine, modality, None, args, timings, "")
            for method, estimate in list(estimates.items())[1:]:
                rows["as_acquired"][method] = r = no_reference(noisy, estimate, modality)
                print(
                    f"{name} {method:16s} sigma {r['sigma_estimated']:.4g}  residual std/sigma "
                    f"{r['residual_std_over_sigma']:.3f}  corr(residual, estimate) "
                    f"{r['residual_vs_estimate_corr']:+.3f}  "
                    f"neighbour corr {r['residual_neighbour_corr']:+.3f}  sigma left {r['sigma_of_estimate']:.4g}",
                    flush=True,
                )
            if args.figure:
                chosen = [m for m in estimates if m.startswith("self_supervised")]
                best = estimates[chosen[-1]] if chosen else noisy
                residual = {"residual": noisy - best}
                figure(estimates | residual, _named(args.figure, name))
            results["data"][name] = {"no_reference": rows, "seconds": timings}
            continue
        config_path = args.ct_config if modality == "ct" else args.config
        config = load_config(config_path, overrides + ["data.folder=."])
        trained = None
        with tempfile.TemporaryDirectory() as work:
            kept = args.prior / f"{name}.pt" if args.prior else None
            if kept is not None and kept.is_file() and {"prior", "prior_ensemble"} & set(args.methods):
                trained = load_trained_model(kept)  # the test-time options on the same prior
            elif {"prior", "prior_ensemble"} & set(args.methods):
                started = time.perf_counter()
                intensities = [intensity_for(a, config.data, modality) for a, _ in data["train"]]
                fit = fit_scan_prior(data["train"], intensities, config, Path(work), modality=modality, progress=name)
                timings["prior_fit_s"] = time.perf_counter() - started
                if kept is not None:
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(fit.model_path, kept)
                trained = load_trained_model(fit.model_path)
            rows = {}
            for j, level in enumerate(args.doses if modality == "ct" else args.levels):
                clean, affine = data["test"][0]
                noisy = noisy_version(data, level, args.seed + j, config.denoise.photons)
                estimates = {"noisy": noisy}
                estimates |= run_methods(args.methods, noisy, affine, modality, trained, args, timings, f"_{level}")
                rows[str(level)] = {m: scores(e, clean, modality) for m, e in estimates.items()}
                if j == 0:
                    pictures[name] = {"clean": clean, **estimates}
                for m, r in rows[str(level)].items():
                    print(
                        f"{name} {level:5.3f} {m:16s} PSNR {r['psnr']:6.2f} / fg {r['psnr_fg']:6.2f}   "
                        f"SSIM {r['ssim']:.3f} / fg {r['ssim_fg']:.3f}   slope {r.get('slope_fg', float('nan')):.3f}"
                        + (f"   RMSE fg {r['rmse_fg_hu']:.1f} HU" if "rmse_fg_hu" in r else ""),
                        flush=True,
                    )
        results["data"][name] = {"scores": rows, "seconds": timings, "config": str(config_path)}
        if args.out:  # after each data set: a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    # the process's peak resident memory (fits and denoising): run one data set / prior per process to compare
    results["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(f"peak resident memory {results['peak_rss_gib']} GiB", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if args.figure:
        for name, images in pictures.items():
            figure(images, _named(args.figure, name), ct=real_data(name)["modality"] == "ct")
    return 0


def _named(path: Path, name: str) -> Path:
    return path.with_name(f"{path.stem}_{name}{path.suffix}")


def figure(pictures: dict[str, np.ndarray], path: Path, *, ct: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = (
        "noisy",
        "bm3d",
        "nlm",
        "prior",
        "prior_ensemble",
        "self_supervised",
        "self_supervised_ensemble",
        "residual",
        "clean",
    )
    names = [n for n in order if n in pictures] + [n for n in pictures if "@" in n]
    reference = pictures.get("clean", pictures["noisy"])
    if ct:
        low, top = -100.0, 200.0  # a brain window
    else:
        low, top = 0.0, float(np.percentile(reference[foreground_mask(reference)], 99.5))
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        image = pictures[name]
        image = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
        if name == "residual":
            spread = 3.0 * float(np.std(image))
            ax.imshow(np.rot90(image), cmap="gray", vmin=-spread, vmax=spread)
        else:
            ax.imshow(np.rot90(image), cmap="gray", vmin=low, vmax=top)
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
