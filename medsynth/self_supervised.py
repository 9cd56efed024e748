"""Self-supervised denoising: a diffusion prior fitted on the noisy scans alone, then its Tweedie estimate.

No clean image enters this path. The steps:

1. the noise level of the scan to denoise: given, or estimated (Rician from the background for MR);
   refused when it is too low to be worth a prior (below ``MIN_RELATIVE_SIGMA`` of the signal);
2. the training scans: the scan itself, or a folder of noisy scans of the same protocol (same modality);
   each normalised with the convention a clean-trained prior uses at denoising time
   (:func:`medsynth.denoise.scan.noisy_scan_intensity`);
3. a pixel-space diffusion model trained on random crops of those *noisy* scans
   (:func:`medsynth.training.scan_prior.fit_scan_prior`, the one training engine): it learns
   ``E[y | y + s n]`` for the noisy data ``y``;
4. the clean estimate from that noisy-data prior (:func:`medsynth.denoise.prior.noisy_prior_denoise`,
   the Noisier2Noise form of Tweedie's formula), averaged over several draws of the added noise;
5. MR magnitude: the Rician noise floor removed from the estimate, as for every other method.

Why this method: it reuses the diffusion trainer and the sliding-window denoiser unchanged, needs no
blind-spot network (DDM2's J-invariant stage) and no annealed score schedule (Noise2Score); numbers in
docs/benchmarks.md ("Denoising real scans").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsynth.config import Config
from medsynth.denoise.scan import (
    Denoised,
    PriorSettings,
    check_noise_level,
    denoise_scan,
    estimate_noise,
    noisy_scan_intensity,
)
from medsynth.errors import MedsynthError
from medsynth.models.loading import TrainedModel, load_trained_model
from medsynth.training.scan_prior import fit_scan_prior


def fit_self_supervised(
    scans: Sequence[tuple[np.ndarray, np.ndarray]],
    config: Config,
    work_dir: Path,
    *,
    modality: str,
    progress: str | None = "fit",
) -> TrainedModel:
    """Fit ``config``'s prior on noisy ``scans`` (``(array, affine)`` in their units); the model file says so.

    Raises:
        MedsynthError: a scan whose noise level cannot be estimated or is too low, or smaller than the crop.
    """
    intensities, sigmas = [], []
    for k, (array, _) in enumerate(scans):
        sigma = estimate_noise(array, modality)
        check_noise_level(array, sigma, f"training scan {k}")
        intensities.append(
            noisy_scan_intensity(array, sigma, modality, config.data.mr_percentile, config.data.ct_window)
        )
        sigmas.append(sigma)
    record = {
        "self_supervised": True,
        "training_scans": len(scans),
        # the noise of the training data, in the model's units: the prior models scans this noisy
        "noise_sigma_normalised": [2.0 * s / (i.high - i.low) for s, i in zip(sigmas, intensities)],
    }
    result = fit_scan_prior(scans, intensities, config, work_dir, modality=modality, record=record, progress=progress)
    return load_trained_model(result.model_path)


def self_supervised_denoise(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str,
    config: Config,
    work_dir: Path,
    train_scans: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    sigma: float | None = None,
    alpha: float = 1.0,
    draws: int = 8,
    seed: int = 0,
    ensemble: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Denoised, TrainedModel]:
    """Fit a prior on ``train_scans`` (default: the scan itself) and denoise ``image`` with it."""
    scans = list(train_scans) if train_scans else [(np.asarray(image, dtype=np.float32), affine)]
    trained = fit_self_supervised(scans, config, work_dir, modality=modality, progress="fit" if progress else None)
    result = denoise_scan(
        image,
        affine,
        method="self_supervised",
        modality=modality,
        sigma=sigma,
        trained=trained,
        settings=PriorSettings(alpha=alpha, draws=draws, seed=seed, ensemble=ensemble),
        device=device,
        progress=progress,
    )
    return result, trained


def default_recipe() -> Path:
    """``configs/denoise_self_supervised.yaml`` of this source tree (the README's editable install)."""
    return Path(__file__).resolve().parents[1] / "configs" / "denoise_self_supervised.yaml"


def training_scans(folder: Path, modality: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The noisy scans of ``--train-folder``: every NIfTI file and DICOM series under it, of ``modality``.

    Raises:
        MedsynthError: an empty folder, or a DICOM series of another modality (named by position).
    """
    from medsynth.io.volumes import find_images, read_any

    scans = []
    for kind, path in find_images(folder):
        for volume in read_any(kind, path):
            if volume.modality and volume.modality != modality:
                raise MedsynthError(
                    f"--train-folder: scan {len(scans)} is {volume.modality.upper()} but the scan to denoise is "
                    f"{modality.upper()}; the training scans must come from the same protocol"
                )
            scans.append((np.asarray(volume.array, dtype=np.float32), volume.affine))
    if not scans:
        raise MedsynthError(f"--train-folder {folder}: no NIfTI files or DICOM series found")
    return scans


def self_supervised_path(
    input_path: str | Path,
    output: str | Path,
    *,
    train_folder: str | Path | None = None,
    checkpoint: str | Path | None = None,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    sigma: float | None = None,
    modality: str | None = None,
    alpha: float = 1.0,
    draws: int = 8,
    seed: int = 0,
    ensemble: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """``medsynth denoise INPUT OUTPUT --self-supervised``: fit a prior on INPUT (or ``train_folder``'s noisy
    scans), or reuse a fitted one (``checkpoint``), then denoise INPUT into OUTPUT in its own format.

    Everything is checked before any fitting; the fit runs in a hidden folder beside OUTPUT (a rerun after an
    interruption resumes it) and the fitted prior is kept as ``<OUTPUT stem>_prior.pt`` (reuse it for other
    scans of the protocol with ``--checkpoint``). Nothing else is written until the denoised scan is.

    Returns:
        The provenance record (also written beside / inside the output).
    """
    import shutil

    from medsynth.config import load_config
    from medsynth.denoise.files import check_output, provenance_record, read_scan, write_result
    from medsynth.io.atomic import atomic_write, file_digest

    scan = read_scan(input_path)
    output = check_output(scan, output, overwrite=overwrite)
    given_prior = load_trained_model(checkpoint, device) if checkpoint is not None else None
    modality = modality or scan.volume.modality or (given_prior.modality if given_prior is not None else None)
    if modality is None:
        raise MedsynthError(f"{scan.path}: the modality is unknown; pass --modality mr or --modality ct")
    if scan.volume.modality and modality != scan.volume.modality:
        raise MedsynthError(
            f"{scan.path}: the DICOM series is {scan.volume.modality.upper()} but --modality is {modality}"
        )
    image = np.asarray(scan.volume.array, dtype=np.float32)
    if not np.isfinite(image).all():
        raise MedsynthError(f"{scan.path}: the image has NaN/Inf values; expected finite intensities")
    noise = float(sigma) if sigma is not None else estimate_noise(image, modality)
    check_noise_level(image, noise, str(scan.path))
    stem = output.name.removesuffix(".gz").removesuffix(".nii")
    prior_file = output.with_name(f"{stem}_prior.pt")
    if checkpoint is not None:
        if train_folder is not None:
            raise MedsynthError(
                "give either --checkpoint (a fitted prior) or --train-folder (scans to fit on), not both"
            )
        trained = given_prior
        assert trained is not None
        if not trained.data.get("self_supervised"):
            raise MedsynthError(
                f"{checkpoint}: a prior trained on clean scans; --self-supervised needs a prior fitted on noisy "
                "scans (leave out --checkpoint to fit one, or drop --self-supervised to use this one)"
            )
        work = None
    else:
        recipe = Path(config_path) if config_path is not None else default_recipe()
        if not recipe.is_file():
            raise MedsynthError(f"--config {recipe}: no such recipe file (configs/denoise_self_supervised.yaml)")
        config = load_config(recipe, [*overrides, "data.folder=."])
        if config.data.patches is None:
            raise MedsynthError(f"{recipe}: key 'data.patches' must be set (the prior trains on crops)")
        if config.data.modality and config.data.modality != modality:
            raise MedsynthError(f"{recipe}: key 'data.modality' is {config.data.modality} but the scan is {modality}")
        scans = (
            training_scans(Path(train_folder), modality) if train_folder is not None else [(image, scan.volume.affine)]
        )
        for k, (array, _) in enumerate(scans):
            check_noise_level(array, estimate_noise(array, modality), f"training scan {k}")
        work = output.with_name(f".{stem}.fit-{scan.digest[:12]}")
        trained = fit_self_supervised(scans, config, work, modality=modality, progress="fit" if progress else None)
    result = denoise_scan(
        image,
        scan.volume.affine,
        method="self_supervised",
        modality=modality,
        sigma=sigma,
        trained=trained,
        settings=PriorSettings(alpha=alpha, draws=draws, seed=seed, ensemble=ensemble),
        device=device,
        progress=progress,
    )
    model_file = Path(checkpoint) if checkpoint is not None else prior_file
    provenance = provenance_record(
        scan, output, result, model_uri=None, checkpoint=model_file, model_digest=file_digest(trained.path)
    )
    # what the prior was fitted on, by count and role only (never the training scans' paths)
    fitted_on = "given prior" if checkpoint is not None else "train folder" if train_folder is not None else "input"
    provenance["denoise"]["prior_fitted_on"] = fitted_on
    written = write_result(scan, result, output, provenance)
    if work is not None:
        atomic_write(prior_file, lambda tmp: shutil.copyfile(trained.path, tmp), suffix=".pt")
        written.append(prior_file)
        shutil.rmtree(work, ignore_errors=True)
    provenance["written"] = [str(p) for p in written]
    return provenance
