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
        settings=PriorSettings(alpha=alpha, draws=draws, seed=seed),
        device=device,
        progress=progress,
    )
    return result, trained
