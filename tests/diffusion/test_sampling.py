"""Samplers against closed forms: for Gaussian data x0 ~ N(0, s^2) the optimal network is known exactly,
so each sampler must return samples with standard deviation s. Parametrised over 2D and 3D shapes."""

from __future__ import annotations

import pytest
import torch
from exact_models import DATA_STD, SHAPES, ExactGaussianModel

from medsynth.config import DiffusionConfig
from medsynth.diffusion.sampling import generate, respaced_ddpm
from medsynth.diffusion.schedulers import build_sampling_scheduler, build_train_scheduler


def std_ratio(scheduler: str, prediction: str, sampler: str, steps: int, shape: tuple[int, ...]) -> float:
    diffusion = DiffusionConfig(
        scheduler=scheduler, prediction_type=prediction, schedule="linear_beta", beta_start=1e-4, beta_end=0.02
    )
    spatial_dims = len(shape) - 1
    chain = build_sampling_scheduler(diffusion, sampler=sampler, steps=steps, spatial_dims=spatial_dims)
    samples = generate(
        ExactGaussianModel(diffusion, spatial_dims),
        chain,
        sampler=sampler,
        image_shape=shape,
        seeds=list(range(8)),
        batch_size=8,
        device=torch.device("cpu"),
    )
    assert samples.shape == (8, *shape) and abs(samples.mean().item()) < 0.03
    return samples.std().item() / DATA_STD


# (process, prediction, sampler, few steps, the seeded std ratio they give in 2D and in 3D, many steps)
CASES = [
    ("ddpm", "epsilon", "ddpm", 1000, (0.9978513916333517, 0.9898873170216879), 1000),
    ("ddpm", "v_prediction", "ddpm", 100, (0.9031015634536743, 0.9110018610954285), 1000),
    ("ddpm", "epsilon", "ddim", 50, (0.9231698513031006, 0.9370056788126628), 500),
    ("ddpm", "v_prediction", "ddim", 20, (0.8521108826001486, 0.865345299243927), 500),
    ("rflow", "v_prediction", "rflow", 50, (0.9452184041341146, 0.9602199991544088), 500),
]


@pytest.mark.parametrize("dim", [0, 1], ids=["2d", "3d"])
@pytest.mark.parametrize("scheduler, prediction, sampler, steps, golden, _many", CASES)
def test_few_step_samplers_golden_std(dim, scheduler, prediction, sampler, steps, golden, _many) -> None:
    # Few steps under-disperse (discretisation error of each solver); a seeded golden per dimension, tight
    # enough that a changed coefficient or noise draw shows.
    assert std_ratio(scheduler, prediction, sampler, steps, SHAPES[dim]) == pytest.approx(golden[dim], rel=1e-5)


@pytest.mark.parametrize("scheduler, prediction, sampler, steps, golden, many", CASES)
def test_samplers_converge_to_the_data_std(scheduler, prediction, sampler, steps, golden, many) -> None:
    # With enough steps every sampler reproduces the exact data distribution.
    assert std_ratio(scheduler, prediction, sampler, many, (1, 16, 16)) == pytest.approx(1.0, abs=0.04)


def test_each_sample_depends_only_on_its_seed() -> None:
    diffusion = DiffusionConfig(prediction_type="epsilon")
    model = ExactGaussianModel(diffusion, 2)
    for sampler, steps in (("ddpm", 20), ("ddim", 10)):
        chain = build_sampling_scheduler(diffusion, sampler=sampler, steps=steps, spatial_dims=2)
        together = generate(
            model,
            chain,
            sampler=sampler,
            image_shape=(1, 8, 8),
            seeds=[5, 6, 7],
            batch_size=3,
            device=torch.device("cpu"),
            eta=0.5,
        )
        alone = generate(
            model,
            chain,
            sampler=sampler,
            image_shape=(1, 8, 8),
            seeds=[6],
            batch_size=1,
            device=torch.device("cpu"),
            eta=0.5,
        )
        assert torch.allclose(together[1], alone[0], atol=1e-5)
        assert not torch.allclose(together[0], together[1])


def test_respaced_ddpm_keeps_the_marginals() -> None:
    base = build_train_scheduler(DiffusionConfig(), spatial_dims=2)
    respaced, model_times = respaced_ddpm(base, 25)
    assert len(model_times) == 25 and model_times[0] == 999 and model_times[-1] == 0
    assert torch.allclose(torch.cumprod(respaced.alphas, 0), respaced.alphas_cumprod, rtol=1e-5)
    assert torch.allclose(respaced.alphas_cumprod.flip(0), base.alphas_cumprod[model_times])


def test_sampler_and_process_must_match() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        build_sampling_scheduler(DiffusionConfig(scheduler="rflow"), sampler="ddim", steps=10, spatial_dims=2)
    with pytest.raises(ValueError, match="exceeds"):
        build_sampling_scheduler(DiffusionConfig(num_train_timesteps=100), sampler="ddim", steps=200, spatial_dims=2)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_batched_ddpm_step_is_monai_step_per_sample_bit_for_bit(prediction: str, clip: bool, variance: str) -> None:
    from monai.networks.schedulers import DDPMScheduler

    from medsynth.diffusion.sampling import _per_sample_step, ddpm_step

    torch.manual_seed(0)
    chain = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction, clip_sample=clip, variance_type=variance)
    chain, _ = respaced_ddpm(chain, 20) if variance == "fixed_small" else (chain, None)
    x, output = torch.randn(5, 1, 8, 8) * 1.5, torch.randn(5, 1, 8, 8)
    for timestep in (len(chain.timesteps) - 1, 7, 0):
        ours = [torch.Generator().manual_seed(10 + i) for i in range(5)]
        monai = [torch.Generator().manual_seed(10 + i) for i in range(5)]
        prev, x0 = ddpm_step(chain, output, timestep, x, ours)
        prev_ref, x0_ref = _per_sample_step(chain.step, output, timestep, x, monai)
        assert torch.equal(prev, prev_ref) and torch.equal(x0, x0_ref), timestep
        # the generators advanced alike: the next steps draw the same noise
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, monai))
