"""Denoise one scan in its own units and geometry, with the diffusion prior or a classical baseline.

The steps for the diffusion prior:

1. the noise level: given, or estimated (Rician from the background for MR, blocks of soft tissue
   in HU for CT, wavelet MAD otherwise);
2. MR magnitude images: the Rician noise floor (``E[M^2] = A^2 + 2 sigma^2``) is removed with
   ``sqrt(max(D^2 - 2 sigma^2, 0))`` from the prior's output D, as for the classical methods
   (denoise, then correct); ``PriorSettings.rician="input"`` corrects the input instead. Both were
   measured (docs/benchmarks.md): correcting the output zeroes the background and gives the better
   whole-image PSNR; the intensity scale (step 3) is always taken from the corrected scan;
3. the scan goes into the model's normalised units with the model's own convention (CT window;
   MR foreground percentile), which also converts sigma;
4. a 2D model runs slice by slice across the axis it was trained on (after reorienting to RAS, as
   training did), a 3D model over the whole volume; both through sliding windows when the scan is
   larger than the training size;
5. back to units; voxels beyond the normalised range (dense bone beyond the CT window, say) keep the
   part of their value the model could not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from medsynth.data.transforms import Intensity, foreground_mask
from medsynth.denoise.classical import denoise_classical
from medsynth.denoise.matching import match_timestep
from medsynth.denoise.prior import noisy_prior_denoise, prior_denoise
from medsynth.denoise.registry import DENOISE_METHOD_NAMES, DENOISE_METHODS, PRIOR_MODES, DenoiseMethod
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.errors import MedsynthError
from medsynth.models.loading import TrainedModel
from medsynth.noise.correction import rician_bias_correct
from medsynth.noise.estimation import estimate_ct_sigma_hu, estimate_gaussian_sigma, estimate_rician_sigma


@dataclass(frozen=True)
class PriorSettings:
    """How the diffusion prior runs (see :func:`medsynth.denoise.prior.prior_denoise`)."""

    mode: str = "tweedie"
    steps: int = 10
    samples: int = 1
    seed: int = 0
    overlap: float = 0.5
    sw_batch_size: int = 16
    slice_batch: int = 32  # 2D slices denoised together (memory vs speed)
    # MR: remove the Rician noise floor from the denoised image ("output", the default: best whole-image
    # PSNR, the background goes to zero) or from the input before the prior ("input": 0.3-0.9 dB better
    # inside the head, 1.3-1.7 dB worse over the whole image); measured in docs/benchmarks.md.
    rician: str = "output"
    # self-supervised priors (noisy_prior_denoise): added noise over the scan's, and estimates averaged
    alpha: float = 1.0
    draws: int = 8
    # every network evaluation averaged over the scan's mirror images (and 90-degree turns where the
    # prior was trained on turned crops): 4-8x the time in 2D, 8x in 3D; measured in docs/benchmarks.md
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.rician not in ("input", "output"):
            raise ValueError(f"rician must be 'input' or 'output', got {self.rician!r}")


@dataclass
class Denoised:
    """A denoised scan in the input's units, with what made it."""

    image: np.ndarray
    uncertainty: np.ndarray | None
    sigma: float  # the noise level used, in the input's units
    record: dict[str, Any] = field(default_factory=dict)


def denoise_method(name: str) -> DenoiseMethod:
    """The registered denoising method ``name``.

    Raises:
        MedsynthError: an unknown name (the message lists the allowed ones).
    """
    if name not in DENOISE_METHODS:
        raise MedsynthError(f"unknown denoising method '{name}' (allowed: {', '.join(DENOISE_METHOD_NAMES)})")
    return DENOISE_METHODS[name]


def estimate_noise(image: np.ndarray, modality: str | None) -> float:
    """The noise standard deviation of a scan in its own units (see the estimators for the methods).

    Raises:
        MedsynthError: the image gives no region to estimate from.
    """
    try:
        if modality == "mr":
            return estimate_rician_sigma(image)
        if modality == "ct":
            return estimate_ct_sigma_hu(image)
        return estimate_gaussian_sigma(image)
    except ValueError as exc:
        raise MedsynthError(
            f"cannot estimate the noise level ({exc}); give it (--sigma, or denoise.sigma in a config)"
        ) from None


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise MedsynthError(f"expected a 2D or 3D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise MedsynthError("image has NaN/Inf values; expected finite intensities")
    return image


def noisy_scan_intensity(
    image: np.ndarray, sigma: float, modality: str, mr_percentile: float, ct_window: Sequence[float] | None
) -> Intensity:
    """The intensity convention of a *noisy* scan. CT: the HU window. MR: the scan's own foreground
    percentile, taken on a TV-denoised copy: noise would raise it (about +10 % at Rician 10 %) and
    smoothing would lower it (thin bright structures, -15 % on 64-pixel heads); the TV copy lands
    within a few per cent of the clean scan's value (measured on the phantoms)."""
    if modality == "ct":
        low, high = ct_window if ct_window else (-1000.0, 1000.0)
        return Intensity("ct", float(low), float(high))
    smooth = denoise_classical(image, sigma, "tv", modality=None) if sigma > 0 else image
    mask = foreground_mask(smooth)
    values = smooth[mask] if mask.any() else smooth.ravel()
    high = float(np.percentile(values, float(mr_percentile)))
    return Intensity("mr", 0.0, high if np.isfinite(high) and high > 0 else float(np.max(image)) or 1.0)


def model_intensity(trained: TrainedModel, image: np.ndarray, sigma: float) -> Intensity:
    """The model's intensity convention applied to this scan: CT the model's window, MR
    :func:`noisy_scan_intensity` with the model's percentile."""
    intensity = trained.intensity
    if intensity.get("modality", "mr") == "ct":
        return Intensity("ct", float(intensity["low"]), float(intensity["high"]))
    return noisy_scan_intensity(image, sigma, "mr", float(trained.data.get("mr_percentile", 99.5)), None)


def to_ras(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array in RAS voxel order (as training saw scans) and the orientation that got it there.

    A 2D image whose axes do not both lie in the axial plane is left as it is.
    """
    ornt = nib.orientations.io_orientation(affine)[: image.ndim]
    if sorted(ornt[:, 0].astype(int)) != list(range(image.ndim)):
        ornt = np.c_[np.arange(image.ndim), np.ones(image.ndim)]
    return nib.orientations.apply_orientation(image, ornt), ornt


def from_ras(image: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    identity = np.c_[np.arange(image.ndim), np.ones(image.ndim)]
    return nib.orientations.apply_orientation(image, nib.orientations.ornt_transform(identity, ornt))


def spacing_warning(trained: TrainedModel, affine: np.ndarray, ndim: int) -> str | None:
    """A note when the scan's in-plane voxel size differs from the training inputs' by more than 25 %."""
    model_spacing = trained.data.get("spacing_mm")
    if not model_spacing:
        return None
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))[:ndim]
    ours, theirs = float(np.median(spacing[: len(model_spacing)])), float(np.median(model_spacing))
    if abs(ours / theirs - 1.0) > 0.25:
        return (
            f"the scan's voxels ({ours:.2f} mm) differ from the model's training inputs ({theirs:.2f} mm); "
            "the prior is learned at its training resolution, so train at the scans' resolution for best results"
        )
    return None


def _diffusion(
    image: np.ndarray,
    affine: np.ndarray,
    sigma: float,
    modality: str | None,
    trained: TrainedModel,
    settings: PriorSettings,
    device: torch.device,
    progress: bool,
) -> Denoised:
    if trained.modality and modality and trained.modality != modality:
        raise MedsynthError(f"the model was trained on {trained.modality.upper()} but the scan is {modality.upper()}")
    modality = modality or trained.modality
    if image.ndim == 2 and trained.spatial_dims == 3:
        raise MedsynthError("a 3D model cannot denoise a 2D image; use a 2D model")
    if trained.data.get("self_supervised"):
        raise MedsynthError(
            f"{trained.path}: a prior fitted on noisy scans; use it with --self-supervised (method self_supervised)"
        )
    if trained.is_latent:
        raise MedsynthError(
            f"{trained.path}: a latent diffusion model cannot denoise (it models latents, not the scan's voxels); "
            "use a pixel-space model (diffusion.space: pixel)"
        )
    # 2. Rician bias (from the input, or later from the output), 3. normalised units
    corrected = rician_bias_correct(image, sigma) if modality == "mr" else image
    intensity = model_intensity(trained, corrected, sigma)
    signal = image if modality == "mr" and settings.rician == "output" else corrected
    width = intensity.high - intensity.low
    normalised = np.asarray(intensity.forward(signal), dtype=np.float32)
    beyond = signal - np.asarray(intensity.inverse(normalised), dtype=np.float32)
    sigma_normalised = 2.0 * sigma / width
    scheduler = build_train_scheduler(trained.diffusion, spatial_dims=trained.spatial_dims)
    limit = trained.diffusion.max_train_timestep
    if limit is not None and match_timestep(sigma_normalised, scheduler).timestep >= limit:
        raise MedsynthError(
            f"{trained.path}: the noise level ({sigma:.4g}, {sigma_normalised:.3f} of the model's range) is beyond the "
            f"timesteps this denoising prior was trained on (below {limit}; diffusion.max_train_timestep)"
        )

    # 4. geometry: RAS voxel order; 2D models slice across the trained axis
    ras, ornt = to_ras(normalised, affine)
    batch, axis = _slices_of(trained, ras)
    network = trained.network.to(device)
    chunks = [slice(i, i + settings.slice_batch) for i in range(0, len(batch), settings.slice_batch)]
    means, stds, last = [], [], None
    unit = "slice" if axis is not None or ras.ndim == 2 else "volume"
    with tqdm(
        total=len(batch), desc=f"denoise (diffusion, {settings.mode})", unit=unit, disable=None if progress else True
    ) as bar:
        for chunk in chunks:
            y = torch.from_numpy(np.ascontiguousarray(batch[chunk])).to(device)
            n = len(y)

            def advance(done: int, total: int, _n: int = n) -> None:
                bar.update(_n * (done / total) - _n * ((done - 1) / total))

            last = prior_denoise(
                network,
                scheduler,
                y,
                sigma_normalised,
                roi_size=trained.image_size,
                mode=settings.mode,
                steps=settings.steps,
                samples=settings.samples,
                seed=settings.seed,
                overlap=settings.overlap,
                sw_batch_size=settings.sw_batch_size,
                # a class-conditional model denoises as its unconditional self (the "no class" token)
                null_class=trained.num_classes,
                ensemble=settings.ensemble,
                turns=_turns(trained),
                callback=advance,
            )
            means.append(last.mean.cpu().numpy())
            if last.std is not None:
                stds.append(last.std.cpu().numpy())
    assert last is not None

    def back(stack: list[np.ndarray]) -> np.ndarray:
        array = np.concatenate(stack)[:, 0]
        array = np.moveaxis(array, 0, axis) if axis is not None else array[0]
        return from_ras(array, ornt)

    # 5. units, plus what lay beyond the normalised range
    out = np.asarray(intensity.inverse(back(means)), dtype=np.float32) + beyond
    if modality == "mr":
        out = np.clip(out, 0.0, None)
        if settings.rician == "output":
            out = rician_bias_correct(out, sigma)
    uncertainty = (back(stds) * width / 2.0).astype(np.float32) if stds else None
    record = {
        "mode": settings.mode,
        "steps": settings.steps if PRIOR_MODES[settings.mode].sampler is not None else None,
        "samples": settings.samples,
        "seed": settings.seed,
        "timestep": last.match.timestep,
        "matched_sigma_normalised": last.match.matched_sigma,
        "sigma_normalised": sigma_normalised,
        "network_evaluations": last.evaluations * settings.samples * _ensemble_size(trained, settings),
        "ensemble": _ensemble_size(trained, settings),
        "rician_bias_correction": settings.rician if modality == "mr" else None,
        "intensity": intensity.as_dict(),
        "model_file": str(trained.path),
        "model_step": trained.step,
        "slice_axis": axis,
    }
    warning = spacing_warning(trained, affine, trained.spatial_dims)
    if warning:
        record["warning"] = warning
    return Denoised(out, uncertainty, sigma, record)


MIN_RELATIVE_SIGMA = 0.005  # noise below 0.5 % of the foreground's 99th percentile: nothing a prior could learn


def relative_noise(image: np.ndarray, sigma: float) -> float:
    """``sigma`` over the foreground's 99th percentile (the scale of the simulated noise levels)."""
    mask = foreground_mask(image)
    top = float(np.percentile(image[mask] if mask.any() else image, 99.0))
    return float(sigma / top) if top > 0 else float("inf")


def check_noise_level(image: np.ndarray, sigma: float, what: str) -> None:
    """Refuse a scan whose noise is too low for a self-supervised prior (``what`` names the scan).

    Raises:
        MedsynthError: ``sigma`` below ``MIN_RELATIVE_SIGMA`` of the signal.
    """
    relative = relative_noise(image, sigma)
    if not relative >= MIN_RELATIVE_SIGMA:
        raise MedsynthError(
            f"{what}: its noise ({relative:.2%} of the signal) is too low to denoise self-supervised "
            f"(needs >= {MIN_RELATIVE_SIGMA:.1%}); is it a clean scan?"
        )


def _turns(trained: TrainedModel) -> bool:
    """Whether the prior was trained on crops turned by 90 degrees (``data.patches.rotations``)."""
    patches = trained.data.get("patches") or {}
    return bool(patches.get("rotations")) and bool(patches.get("flips"))


def _ensemble_size(trained: TrainedModel, settings: PriorSettings) -> int:
    return (2**trained.spatial_dims) * (2 if _turns(trained) else 1) if settings.ensemble else 1


def _slices_of(trained: TrainedModel, ras: np.ndarray) -> tuple[np.ndarray, int | None]:
    """The batch a network denoises: 2D models one slice per item across the trained axis, 3D the volume."""
    if trained.spatial_dims == 2 and ras.ndim == 3:
        axis = int(trained.data.get("slice_axis", 2))
        return np.moveaxis(ras, axis, 0)[:, None], axis  # (slices, 1, a, b)
    return ras[None, None], None


def _self_supervised(
    image: np.ndarray,
    affine: np.ndarray,
    sigma: float,
    modality: str | None,
    trained: TrainedModel,
    settings: PriorSettings,
    device: torch.device,
    progress: bool,
) -> Denoised:
    """Denoise with a prior fitted on noisy scans (:func:`medsynth.self_supervised.fit_self_supervised`):
    the Noisier2Noise estimate of :func:`~medsynth.denoise.prior.noisy_prior_denoise`, then units and the
    Rician floor as for the clean prior."""
    if not trained.data.get("self_supervised"):
        raise MedsynthError(
            f"{trained.path}: a prior trained on clean scans; self-supervised denoising needs a prior fitted on noisy "
            "scans (leave out --checkpoint to fit one, or drop --self-supervised to use this one)"
        )
    modality = modality or trained.modality
    if trained.modality and modality != trained.modality:
        raise MedsynthError(f"the prior was fitted on {trained.modality.upper()} but the scan is {modality.upper()}")
    if image.ndim == 2 and trained.spatial_dims == 3:
        raise MedsynthError("a 3D prior cannot denoise a 2D image")
    check_noise_level(image, sigma, "the scan")
    intensity = noisy_scan_intensity(
        image, sigma, modality or "mr", float(trained.data.get("mr_percentile", 99.5)), trained.data.get("ct_window")
    )
    width = intensity.high - intensity.low
    normalised = np.asarray(intensity.forward(image), dtype=np.float32)
    beyond = image - np.asarray(intensity.inverse(normalised), dtype=np.float32)
    sigma_normalised = 2.0 * sigma / width
    scheduler = build_train_scheduler(trained.diffusion, spatial_dims=trained.spatial_dims)
    ras, ornt = to_ras(normalised, affine)
    batch, axis = _slices_of(trained, ras)
    network = trained.network.to(device)
    means, last = [], None
    with tqdm(
        total=len(batch), desc="denoise (self-supervised)", unit="slice", disable=None if progress else True
    ) as bar:
        for start in range(0, len(batch), settings.slice_batch):
            y = torch.from_numpy(np.ascontiguousarray(batch[start : start + settings.slice_batch])).to(device)
            last = noisy_prior_denoise(
                network,
                scheduler,
                y,
                sigma_normalised,
                roi_size=trained.image_size,
                alpha=settings.alpha,
                draws=settings.draws,
                seed=settings.seed + start,
                overlap=settings.overlap,
                sw_batch_size=settings.sw_batch_size,
                ensemble=settings.ensemble,
                turns=_turns(trained),
            )
            means.append(last.mean.cpu().numpy())
            bar.update(len(y))
    assert last is not None
    array = np.concatenate(means)[:, 0]
    array = np.moveaxis(array, 0, axis) if axis is not None else array[0]
    out = np.asarray(intensity.inverse(from_ras(array, ornt)), dtype=np.float32) + beyond
    if modality == "mr":
        out = rician_bias_correct(np.clip(out, 0.0, None), sigma)
    record = {
        "alpha": settings.alpha,
        "draws": settings.draws,
        "seed": settings.seed,
        "timestep": last.match.timestep,
        "added_sigma_normalised": last.match.matched_sigma,
        "sigma_normalised": sigma_normalised,
        "network_evaluations": settings.draws * _ensemble_size(trained, settings),
        "ensemble": _ensemble_size(trained, settings),
        "rician_bias_correction": "output" if modality == "mr" else None,
        "intensity": intensity.as_dict(),
        "model_file": str(trained.path),
        "model_step": trained.step,
        "training_scans": trained.data.get("training_scans"),
        "slice_axis": axis,
    }
    return Denoised(out, None, sigma, record)


def denoise_scan(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    method: str,
    modality: str | None,
    sigma: float | None = None,
    trained: TrainedModel | None = None,
    settings: PriorSettings | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Denoised:
    """Denoise one scan (2D or 3D, in its units) and return it in the same units and voxel order.

    Args:
        image: the noisy scan, ``(X, Y)`` or ``(X, Y, Z)``.
        affine: its voxel-to-RAS affine (sets the slice direction for 2D models).
        method: a name of :data:`~medsynth.denoise.registry.DENOISE_METHODS` (``diffusion`` or a classical baseline).
        modality: ``mr`` (Rician noise: bias correction), ``ct`` (HU) or ``None``.
        sigma: the noise level in the image's units; ``None`` estimates it.
        trained: the diffusion model (``method="diffusion"`` only).
        settings: how the diffusion prior runs.
        device: where the network runs.
        progress: show a progress bar per slice / volume.

    Raises:
        MedsynthError: unknown method, negative sigma, NaN image, a missing or unsuitable model.
    """
    image = _check_image(image)
    spec = denoise_method(method)
    if sigma is not None and not (np.isfinite(sigma) and sigma >= 0):
        raise MedsynthError(f"--sigma must be 'auto' or a number >= 0, got {sigma}")
    given = sigma is not None
    sigma = float(sigma) if given else estimate_noise(image, modality)
    if spec.family in ("self_supervised", "prior"):
        if trained is None:
            raise MedsynthError(
                "self-supervised denoising needs a prior fitted on noisy scans first"
                if spec.family == "self_supervised"
                else "the diffusion method needs a model: --checkpoint PATH or --model-uri URI"
            )
        run_prior = _self_supervised if spec.family == "self_supervised" else _diffusion
        result = run_prior(
            image,
            np.asarray(affine, dtype=np.float64),
            sigma,
            modality,
            trained,
            settings or PriorSettings(),
            torch.device(device),
            progress,
        )
    else:
        try:
            out = denoise_classical(image, sigma, method, modality=modality)
        except ValueError as exc:
            raise MedsynthError(str(exc)) from None
        result = Denoised(np.asarray(out, dtype=np.float32), None, sigma, {"rician_bias_corrected": modality == "mr"})
    result.record = {
        "method": method,
        "modality": modality,
        "sigma": sigma,
        "sigma_source": "given" if given else "estimated",
    } | result.record
    if result.image.shape != image.shape and result.image.size == image.size:
        # a one-slice volume (X, Y, 1) goes through a 2D model as (X, Y): hand it back in the input's shape
        result.image = result.image.reshape(image.shape)
        if result.uncertainty is not None:
            result.uncertainty = result.uncertainty.reshape(image.shape)
    return result
