"""The network read as a denoiser over sigma: the same x0 as MONAI's scheduler arithmetic, 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from medsynth.diffusion.denoiser import Denoiser, guided, input_scale, timestep_sigmas

SHAPES = [(2, 1, 16, 16), (2, 1, 8, 8, 8)]


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Any nonlinear output that depends on the timestep, standing in for a trained network."""
    return torch.tanh(2.0 * x) * (0.5 + t.float().view(-1, *[1] * (x.ndim - 1)) / 1000.0) + 0.1


def inputs(shape: tuple[int, ...]) -> torch.Tensor:
    return 1.5 * torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("monai_class", [DDPMScheduler, DDIMScheduler])
def test_x0_is_monai_schedulers_pred_original_sample(shape, prediction, clip, monai_class) -> None:
    scheduler = monai_class(num_train_timesteps=1000, prediction_type=prediction, clip_sample=clip)
    scheduler.set_timesteps(10)
    denoiser = Denoiser(network, scheduler, clip=clip)
    x_t = inputs(shape)
    for t in (0, 10, 250, 700, 999):
        steps = torch.full((shape[0],), t)
        _, expected = scheduler.step(network(x_t, steps), t, x_t)
        sigma = float(timestep_sigmas(scheduler)[t])
        # x_t = sqrt(abar) x: the same point in the variance-exploding view; the round trip x_t -> x -> x_t
        # costs an ulp, which the epsilon conversion amplifies by 1 / sqrt(abar) (150 at t = 999)
        got = denoiser(x_t / input_scale(scheduler, sigma), sigma)
        amplification = float(scheduler.alphas_cumprod[t]) ** -0.5
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * amplification)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_x0_is_monai_rectified_flow_pred_original_sample(shape) -> None:
    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=True, spatial_dim=len(shape) - 2)
    scheduler.set_timesteps(10)
    denoiser = Denoiser(network, scheduler, clip=False)
    x_t = inputs(shape)
    for t in (0, 10, 250, 700, 999):
        _, expected = scheduler.step(network(x_t, torch.full((shape[0],), t)), t, x_t)
        sigma = float(timestep_sigmas(scheduler)[t])
        got = denoiser(x_t / input_scale(scheduler, sigma), sigma)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sigma_and_timestep_map_onto_each_other() -> None:
    for scheduler in (DDPMScheduler(num_train_timesteps=200), RFlowScheduler(num_train_timesteps=200)):
        denoiser = Denoiser(network, scheduler)
        t = torch.arange(200)
        assert torch.equal(denoiser.sigma_to_t(denoiser.t_to_sigma(t)), t)
        # a level between two trained ones goes to the nearer in log sigma
        low, high = denoiser.t_to_sigma(50), denoiser.t_to_sigma(51)
        assert int(denoiser.sigma_to_t(low * (high / low) ** 0.4)) == 50
        assert int(denoiser.sigma_to_t(low * (high / low) ** 0.6)) == 51
    rflow = Denoiser(network, RFlowScheduler(num_train_timesteps=200))
    assert float(rflow.t_to_sigma(0)) == 0.0 and int(rflow.sigma_to_t(0.0)) == 0


@pytest.mark.parametrize("scheduler", [DDPMScheduler(1000, prediction_type="v_prediction"), RFlowScheduler(1000)])
def test_one_level_per_sample_is_each_sample_at_its_own_level(scheduler) -> None:
    denoiser = Denoiser(network, scheduler)
    x = inputs((3, 1, 8, 8))
    sigmas = timestep_sigmas(scheduler)[torch.tensor([5, 300, 900])]
    together = denoiser(x, sigmas)
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], denoiser(x[i : i + 1], float(sigmas[i])), rtol=1e-5, atol=1e-6)


def test_unconditional_self_labels_every_call_with_the_null_class() -> None:
    seen = []

    def model(x, timesteps, class_labels):
        seen.append(class_labels)
        return x

    f = guided(model, class_labels=None, null_class=4)
    f(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    f(torch.zeros(5, 1, 4, 4), torch.zeros(5, dtype=torch.long))  # e.g. a batch of windows
    assert [c.tolist() for c in seen] == [[4] * 3, [4] * 5]
