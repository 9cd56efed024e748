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
from medsynth.denoise.prior import _reverse_timesteps, prior_denoise, self_ensemble
from medsynth.diffusion.denoiser import timestep_sigmas
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
@pytest.mark.parametrize("process,prediction,evaluations", [(*p, n) for p, n in zip(PROCESSES, (88, 88, 231))])
def test_posterior_draws_have_the_posterior_spread(process, prediction, evaluations, shape):
    model, scheduler = setup(process, prediction, shape)
    sigma = match_timestep(0.3, scheduler).matched_sigma
    x0, y = noisy_batch(shape, sigma, batch=2)
    # Every trained timestep from the matched one down: coarser chains under-disperse (measured
    # 0.72 / 0.89 / 0.94 of the posterior spread at 5 / 20 / 50 steps).
    result = prior_denoise(
        model, scheduler, y, sigma, roi_size=shape[1:], mode="ancestral", steps=1000, samples=8, seed=3
    )
    posterior_std = (DATA_STD**2 * sigma**2 / (DATA_STD**2 + sigma**2)) ** 0.5
    assert result.std is not None and result.std.shape == y.shape and result.evaluations == evaluations
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


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("process,prediction", PROCESSES)
def test_ddim_mode_is_monais_scheduler_steps_on_the_same_timesteps(process, prediction, shape):
    """The deterministic mode (Euler steps over sigma) is MONAI's DDIM step, or its rectified-flow step,
    on the prior's timesteps 200 -> 150 -> 100 -> 50, landing on that step's x0 estimate."""
    from monai.networks.schedulers import DDIMScheduler

    model, scheduler = setup(process, prediction, shape)
    sigma = float(timestep_sigmas(scheduler)[200])
    # the deterministic path ends near s / sqrt(s^2 + sigma^2) y: kept inside [-1, 1], where nothing is clipped
    y = noisy_batch(shape, sigma)[1].clamp(-1.1, 1.1)
    result = prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:], mode="ddim", steps=4)
    if process == "rflow":
        monai = scheduler
    else:
        monai = DDIMScheduler(
            num_train_timesteps=1000,
            schedule="linear_beta",
            beta_start=1e-4,
            beta_end=0.02,
            prediction_type=prediction,
            clip_sample=False,
        )
    monai.set_timesteps(20)  # DDIM's stride of 50 trained timesteps
    x = match_timestep(sigma, scheduler).scale * y
    for t in (200, 150, 100, 50):
        output = model(x, timesteps=torch.full((len(x),), t))
        x, x0 = monai.step(output, t, x, t - 50) if process == "rflow" else monai.step(output, t, x)
    assert x0.abs().max() < 1  # nothing clipped: the same arithmetic
    torch.testing.assert_close(result.mean, x0, rtol=1e-5, atol=1e-5)


# The first voxels (flat indices 0, 37, 101, 255, 300, 511) of the ddim (6 steps) and ancestral (6 steps,
# 2 draws, seed 5) modes at sigma 0.3, recorded before the modes ran over the shared denoiser.
GOLDEN = {
    (2, "ddpm", "epsilon", "ddim"): [-0.3344226, -0.4445426, -0.1797211, 0.0315597, 0.1151616, -0.6744334],
    (2, "ddpm", "epsilon", "ancestral"): [-0.1021709, -0.2766648, -0.05269, -0.0124882, 0.1102318, -0.5508046],
    (2, "ddpm", "v_prediction", "ddim"): [-0.3344225, -0.4445426, -0.1797211, 0.0315597, 0.1151616, -0.6744334],
    (2, "ddpm", "v_prediction", "ancestral"): [-0.1021709, -0.2766648, -0.05269, -0.0124882, 0.1102318, -0.5508045],
    (2, "rflow", "v_prediction", "ddim"): [-0.3365201, -0.447331, -0.1808483, 0.0317577, 0.115884, -0.6786637],
    (3, "ddpm", "epsilon", "ddim"): [-0.4420374, 0.3356676, -0.1356273, -0.3007289, 0.2974649, -0.1395628],
    (3, "ddpm", "epsilon", "ancestral"): [-0.1699368, 0.22949, -0.0700211, -0.1694674, 0.175579, -0.1108126],
    (3, "ddpm", "v_prediction", "ddim"): [-0.4420374, 0.3356676, -0.1356273, -0.300729, 0.2974649, -0.1395628],
    (3, "ddpm", "v_prediction", "ancestral"): [-0.1699368, 0.22949, -0.0700211, -0.1694674, 0.175579, -0.1108126],
    (3, "rflow", "v_prediction", "ddim"): [-0.44481, 0.3377729, -0.136478, -0.3026152, 0.2993307, -0.1404382],
}


@pytest.mark.parametrize("case", list(GOLDEN), ids=lambda c: "-".join(map(str, c)))
def test_modes_match_their_golden_voxels(case):
    dims, process, prediction, mode = case
    shape = SHAPES[dims - 2]
    model, scheduler = setup(process, prediction, shape)
    g = torch.Generator().manual_seed(0)
    x0 = DATA_STD * torch.randn((2, *shape), generator=g)
    y = x0 + 0.3 * torch.randn((2, *shape), generator=g)
    samples = 2 if mode == "ancestral" else 1
    result = prior_denoise(model, scheduler, y, 0.3, roi_size=shape[1:], mode=mode, steps=6, samples=samples, seed=5)
    voxels = result.mean.flatten()[[0, 37, 101, 255, 300, 511]].double()
    torch.testing.assert_close(voxels, torch.tensor(GOLDEN[case], dtype=torch.float64), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("spatial_dims, turns, count", [(2, False, 4), (2, True, 8), (3, False, 8)])
def test_self_ensemble_averages_the_mirror_images(spatial_dims, turns, count):
    """A flip-equivariant network is its own ensemble; any other becomes the mean over the mirror images
    (here a network that returns a fixed pattern: the ensemble returns that pattern symmetrised)."""
    shape = (2, 1, *([6] * spatial_dims))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(2, dtype=torch.long)
    pointwise = self_ensemble(lambda z, _t: z**3, spatial_dims, turns=turns)
    torch.testing.assert_close(pointwise(x, t), x**3)
    pattern = torch.arange(float(6**spatial_dims)).reshape(1, 1, *([6] * spatial_dims))
    fixed = self_ensemble(lambda z, _t: pattern.expand_as(z), spatial_dims, turns=turns)
    axes = list(range(2, 2 + spatial_dims))
    images = [
        pattern.flip([a for a, on in zip(axes, mask) if on])
        for mask in torch.cartesian_prod(*[torch.tensor([False, True])] * spatial_dims)
        .reshape(-1, spatial_dims)
        .tolist()
    ]
    if turns:
        images += [i.transpose(2, 3) for i in images]
    torch.testing.assert_close(fixed(x, t), torch.stack(images).mean(0).expand_as(x))
    assert pointwise.transforms == count


def test_ensemble_on_a_symmetric_exact_model_leaves_tweedie_unchanged():
    shape = (1, 12, 12)
    model, scheduler = setup("ddpm", "v_prediction", shape)
    sigma = match_timestep(0.2, scheduler).matched_sigma
    _, y = noisy_batch(shape, sigma)
    plain = prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:])
    both = prior_denoise(model, scheduler, y, sigma, roi_size=shape[1:], ensemble=True, turns=True)
    torch.testing.assert_close(both.mean, plain.mean, atol=1e-5, rtol=1e-4)


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
