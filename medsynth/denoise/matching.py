"""Noise level -> diffusion time: where a noisy scan enters the reverse process.

A scan ``y = x0 + sigma * n`` (normalised units, white Gaussian n) is a sample of the forward
process once it is scaled: DDPM has ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, so
``sqrt(abar_t) * y`` is ``x_t`` exactly when ``abar_t sigma^2 = 1 - abar_t``, i.e.
``abar_t = 1 / (1 + sigma^2)``; rectified flow has ``x_tau = (1 - tau) x0 + tau n``, so
``(1 - tau) * y`` is ``x_tau`` when ``tau = sigma / (1 + sigma)``. Written by hand: no kept library
maps a measured noise level onto a trained schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import Scheduler

from medsynth.diffusion.denoiser import input_scale, timestep_sigmas


@dataclass(frozen=True)
class NoiseMatch:
    """Where to start: the trained timestep, the factor to scale the noisy input by, and the noise
    level that timestep really has (the nearest one on the discrete schedule)."""

    timestep: int
    scale: float
    matched_sigma: float


def match_timestep(sigma: float, scheduler: Scheduler) -> NoiseMatch:
    """The trained timestep whose marginal noise matches ``sigma`` (in the model's normalised units).

    Raises:
        ValueError: ``sigma`` negative or not finite.
    """
    if not (sigma >= 0 and torch.isfinite(torch.tensor(float(sigma)))):
        raise ValueError(f"noise level must be a finite number >= 0, got {sigma}")
    ratio = timestep_sigmas(scheduler)  # noise-to-signal of the scaled input at each trained timestep
    t = int(torch.argmin((ratio - sigma).abs()))
    return NoiseMatch(t, float(input_scale(scheduler, ratio[t])), float(ratio[t]))
