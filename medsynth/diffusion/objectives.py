"""Training objectives: what the network is asked to predict, and how timesteps are weighted."""

from __future__ import annotations

import torch
from monai.networks.schedulers import RFlowScheduler, Scheduler


def sample_timesteps(
    scheduler: Scheduler, batch: int, *, generator: torch.Generator, device: torch.device, high: int | None = None
) -> torch.Tensor:
    """Uniform training timesteps in ``[0, high)`` (default: all), drawn from ``generator`` so that a
    resumed run draws the same ones.

    (``RFlowScheduler.sample_timesteps`` draws from the global RNG; for the uniform method this is the
    same distribution with an explicit generator.)
    """
    num = min(high or scheduler.num_train_timesteps, scheduler.num_train_timesteps)
    if isinstance(scheduler, RFlowScheduler):
        return (torch.rand(batch, generator=generator, device=device) * num).long()
    return torch.randint(0, num, (batch,), generator=generator, device=device).long()


def prediction_target(
    scheduler: Scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The regression target of the network.

    epsilon: the noise (Ho et al. 2020); v_prediction: ``sqrt(a) * eps - sqrt(1 - a) * x0`` (Salimans & Ho
    2022); rectified flow: the velocity ``x0 - noise`` in MONAI's time convention (Liu et al. 2022).
    """
    if isinstance(scheduler, RFlowScheduler):
        return x0 - noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise


def min_snr_weights(
    scheduler: Scheduler, timesteps: torch.Tensor, prediction_type: str, gamma: float | None
) -> torch.Tensor | None:
    """Min-SNR-γ loss weights per sample (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR").

    The weight on the x0-space error is ``min(SNR, γ)``; expressed on the epsilon loss that is
    ``min(SNR, γ) / SNR`` and on the v loss ``min(SNR, γ) / (SNR + 1)``. ``None`` when off or not
    applicable (rectified flow).
    """
    if gamma is None or isinstance(scheduler, RFlowScheduler):
        return None
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted, averaged over the batch."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
