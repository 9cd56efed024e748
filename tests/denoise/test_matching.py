"""Noise level -> timestep matching, and Rician bias correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.config import DiffusionConfig
from medsynth.denoise.matching import match_timestep
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.noise.correction import rician_bias_correct
from medsynth.noise.models import rician_noise


@pytest.mark.parametrize("process", ["ddpm", "rflow"])
@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.6])
def test_scaled_noisy_input_has_the_marginal_of_the_matched_timestep(process: str, sigma: float) -> None:
    scheduler = build_train_scheduler(DiffusionConfig(scheduler=process), spatial_dims=2)
    match = match_timestep(sigma, scheduler)
    # The nearest trained level: the discrete DDPM schedule is coarse at its low end (t=0: 0.039,
    # t=1: 0.055 noise-to-signal), so allow that step.
    assert match.matched_sigma == pytest.approx(sigma, rel=0.15)
    # The scaled noisy scan has the noise of x_t: sqrt(1 - abar) for DDPM, tau for rectified flow.
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 64, 64), 0.3)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=generator)
    scaled = match.scale * noisy
    if process == "ddpm":
        abar = float(scheduler.alphas_cumprod[match.timestep])
        expected_noise, expected_signal = (1 - abar) ** 0.5, abar**0.5
    else:
        tau = match.timestep / scheduler.num_train_timesteps
        expected_noise, expected_signal = tau, 1 - tau
    mismatch = abs(match.matched_sigma / sigma - 1.0)  # the schedule's discreteness
    assert (scaled - expected_signal * x0).std().item() == pytest.approx(expected_noise, rel=0.05 + mismatch)


def test_more_noise_means_later_timestep() -> None:
    scheduler = build_train_scheduler(DiffusionConfig(), spatial_dims=2)
    steps = [match_timestep(s, scheduler).timestep for s in (0.0, 0.05, 0.1, 0.3, 1.0)]
    assert steps == sorted(steps) and steps[0] == 0


def test_negative_sigma_refused() -> None:
    with pytest.raises(ValueError):
        match_timestep(-0.1, build_train_scheduler(DiffusionConfig(), spatial_dims=2))


def test_rician_bias_correction_reduces_the_floor() -> None:
    sigma = 10.0
    truth = np.zeros((128, 128), np.float32)
    truth[:, 64:] = 20.0  # SNR 2: strongly biased by Rician noise
    noisy = rician_noise(truth, sigma, seed=0)
    corrected = rician_bias_correct(noisy, sigma)
    # The background floor (sigma * sqrt(pi/2) = 12.5) drops by more than half.
    assert corrected[:, :64].mean() < 0.5 * noisy[:, :64].mean()
    # Unbiased in A^2 (the second-moment correction), here at SNR 2.
    assert (corrected[:, 64:].astype(np.float64) ** 2).mean() == pytest.approx(400.0, rel=0.1)
    assert (noisy[:, 64:].astype(np.float64) ** 2).mean() == pytest.approx(400.0 + 2 * sigma**2, rel=0.1)


@pytest.mark.parametrize("process", ["ddpm", "rflow"])
def test_the_matched_level_is_the_denoisers_own(process: str) -> None:
    from medsynth.diffusion.denoiser import Denoiser, input_scale

    scheduler = build_train_scheduler(DiffusionConfig(scheduler=process), spatial_dims=2)
    match = match_timestep(0.2, scheduler)
    denoiser = Denoiser(lambda x, t: x, scheduler)
    assert float(denoiser.t_to_sigma(match.timestep)) == match.matched_sigma
    assert int(denoiser.sigma_to_t(match.matched_sigma)) == match.timestep
    assert match.scale == pytest.approx(float(input_scale(scheduler, match.matched_sigma)), rel=1e-12)
