"""The diffusion-prior denoiser against closed forms.

For Gaussian data ``x0 ~ N(0, s^2)`` and ``y = x0 + sigma n`` the posterior is Gaussian with mean
``s^2 / (s^2 + sigma^2) y`` and variance ``s^2 sigma^2 / (s^2 + sigma^2)``; with the exact network
(tests/exact_models.py) the Tweedie mode must return that mean, and posterior draws must have that
spread. Parametrised over 2D and 3D shapes and over DDPM (epsilon, v) and rectified flow.
"""

from __future__ import annotations

import pytest
import torch
from exact_models import DATA_STD, SHAPES, ExactGaussianModel

from medsynth.config import DiffusionConfig
from medsynth.denoise.matching import match_timestep
from medsynth.denoise.prior import _reverse_timesteps, prior_denoise
from medsynth.diffusion.schedulers import build_train_scheduler

PROCESSES = [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("rflow", "v_prediction")]


def setup(process: str, prediction: str, shape: tuple[int, ...]):
    diffusion = DiffusionConfig(
        scheduler=process, prediction_type=prediction, schedule="linear_beta", beta_start=1e-4, beta_end=0.02
    )
    scheduler = build_train_scheduler(diffusion, spatial_dims=len(shape) - 1)
    return ExactGaussianModel(diffusion, len(shape) - 1), scheduler


def noisy_batch(
    shape: tuple[int, ...], sigma: float, seed: int = 0, batch: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = DATA_STD * torch.randn((batch, *shape), generator=g)
    return x0, x0 + sigma * torch.randn((batch, *shape), generator=g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("process,prediction", PROCESSES)
def test_tweedie_is_the_exact_posterior_mean(process, prediction, shape):
    model, scheduler = setup(process, prediction, shape)
    # A noise level that lies exactly on the schedule, so that the match is exact.
    sigma = match_timestep(0.2, scheduler).matched_sigma
    _, y = noisy_batch(shape, sigma)
    result = prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:], mode="tweedie")
    expected = (DATA_STD**2 / (DATA_STD**2 + sigma**2) * y).clamp(-1, 1)
    assert result.evaluations == 1 and result.std is None
    torch.testing.assert_close(result.mean, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("process,prediction", PROCESSES[:2])
def test_posterior_draws_have_the_posterior_spread(process, prediction, shape):
    model, scheduler = setup(process, prediction, shape)
    sigma = match_timestep(0.3, scheduler).matched_sigma
    x0, y = noisy_batch(shape, sigma, batch=2)
    # Every trained timestep from the matched one down (88 here): coarser chains under-disperse
    # (measured 0.72 / 0.89 / 0.94 of the posterior spread at 5 / 20 / 50 steps).
    result = prior_denoise(
        model, scheduler, y, sigma, roi_size=shape[1:], mode="ancestral", steps=1000, samples=8, seed=3
    )
    posterior_std = (DATA_STD**2 * sigma**2 / (DATA_STD**2 + sigma**2)) ** 0.5
    assert result.std is not None and result.std.shape == y.shape and result.evaluations == 88
    # E[sample std of 8 draws] = c4(8) sigma = 0.965 sigma
    assert result.std.mean().item() == pytest.approx(0.965 * posterior_std, rel=0.05)
    mean = DATA_STD**2 / (DATA_STD**2 + sigma**2) * y
    # The average of 8 draws scatters around the posterior mean by posterior_std / sqrt(8).
    assert (result.mean - mean).std().item() == pytest.approx(posterior_std / 8**0.5, rel=0.25)
    # Same seed -> same draws; another seed -> other draws.
    again = prior_denoise(
        model, scheduler, y, sigma, roi_size=shape[1:], mode="ancestral", steps=1000, samples=8, seed=3
    )
    assert torch.equal(again.mean, result.mean)
    few = [
        prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:], mode="ancestral", steps=5, samples=2, seed=s)
        for s in (4, 5)
    ]
    assert not torch.equal(few[0].mean, few[1].mean)


@pytest.mark.parametrize("process,prediction", PROCESSES)
def test_ddim_lowers_the_error(process, prediction):
    shape = SHAPES[0]
    model, scheduler = setup(process, prediction, shape)
    sigma = 0.3
    x0, y = noisy_batch(shape, sigma)
    result = prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:], mode="ddim", steps=10)
    assert 1 <= result.evaluations <= 10
    assert (result.mean - x0).pow(2).mean() < 0.6 * (y - x0).pow(2).mean()


def test_windowed_pointwise_model_equals_the_whole_image():
    """Gaussian blending of a pointwise model's windows reproduces the unwindowed result: no seams."""
    shape = (1, 40, 24, 20)
    model, scheduler = setup("ddpm", "v_prediction", shape)
    sigma = match_timestep(0.2, scheduler).matched_sigma
    _, y = noisy_batch(shape, sigma, batch=1)
    whole = prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:], mode="ddim", steps=4)
    windows = prior_denoise(model, scheduler, y, sigma, roi_size=(16, 16, 16), mode="ddim", steps=4, overlap=0.5)
    torch.testing.assert_close(windows.mean, whole.mean, atol=1e-5, rtol=1e-4)


def test_reverse_timesteps():
    assert _reverse_timesteps(9, 3) == [9, 6, 3, 0]
    assert _reverse_timesteps(2, 10) == [2, 1, 0]
    assert _reverse_timesteps(0, 5) == [0]


def test_bad_arguments():
    model, scheduler = setup("ddpm", "epsilon", SHAPES[0])
    y = torch.zeros((1, *SHAPES[0]))
    with pytest.raises(ValueError, match="allowed: tweedie, ddim, ancestral"):
        prior_denoise(model, scheduler, y, 0.1, roi_size=(16, 16), mode="euler")
    with pytest.raises(ValueError, match="needs mode 'ancestral'"):
        prior_denoise(model, scheduler, y, 0.1, roi_size=(16, 16), mode="ddim", samples=3)
    with pytest.raises(ValueError, match="finite number >= 0"):
        prior_denoise(model, scheduler, y, -0.1, roi_size=(16, 16))
