"""Score-based samplers: lists of noise levels sigma over the network read as a denoiser.

Every sampler takes the denoiser ``D(x, sigma)`` of :mod:`medsynth.diffusion.denoiser`, ``x`` at the
first noise level (``x = x0 + sigmas[0] n``) and descending ``sigmas`` ending in 0, with one
signature after k-diffusion's ``sampling.py``: ``sampler(denoiser, x, sigmas, *, noise=None,
callback=None) -> x0``. ``noise(x)`` draws fresh standard normal noise of ``x``'s shape for the
stochastic samplers (:func:`per_sample_noise` ties each sample to its own generator);
``callback(step, total)`` reports progress. Euler and Heun integrate the probability-flow ODE
``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, "EDM"), Euler-ancestral and the
predictor-corrector sampler the reverse SDE (Song et al. 2021), DPM-Solver++(2M) the ODE in log
sigma (Lu et al. 2022). The same functions denoise a noisy scan from its own noise level
(:mod:`medsynth.denoise.prior`). Written by hand: MONAI ships none of these for its schedulers.

For synthesis the noise levels follow the Karras schedule (``rho = 7``) between the smallest and the
largest trained sigma, each snapped to the nearest *trained* level so that the network only sees
timesteps it was trained on (duplicates dropped, so very many steps give at most the trained number).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.networks.schedulers import Scheduler

from medsynth.diffusion.denoiser import Denoiser, Model, nearest_timestep, timestep_sigmas

DenoiserFn = Callable[[torch.Tensor, float], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, int], None] | None
RHO = 7.0
PC_SNR = 0.16  # Langevin corrector's signal-to-noise ratio (Song et al. 2021, VE models)


# ---------------------------------------------------------------------------------------------
# Noise levels
# ---------------------------------------------------------------------------------------------


@dataclass
class SigmaSchedule:
    """Descending noise levels ending in 0 for a network trained with ``scheduler``, and how to read it."""

    sigmas: torch.Tensor  # float64, (steps + 1,), last 0
    scheduler: Scheduler  # the trained forward process (DDPM or rectified flow)
    prediction_type: str
    clip: bool = True  # keep the denoiser's x0 in [-1, 1] (images; not latents)

    @property
    def timesteps(self) -> torch.Tensor:
        """The trained timestep of each non-zero level (long, ``(steps,)``)."""
        return nearest_timestep(self.sigmas[:-1], timestep_sigmas(self.scheduler))

    @property
    def initial_scale(self) -> float:
        """Standard deviation of x at the largest noise level for data of unit variance or less."""
        return float(torch.sqrt(1.0 + self.sigmas[0] ** 2))

    def denoiser(self, model: Model) -> Denoiser:
        """``model`` (``f(x_t, t)``, conditioning bound) as the denoiser these levels are meant for."""
        return Denoiser(model, self.scheduler, prediction_type=self.prediction_type, clip=self.clip)


def trained_sigmas(scheduler: Scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise level of every trained timestep with a non-zero one (ascending with t), float64, and
    those timesteps."""
    sigmas = timestep_sigmas(scheduler)
    keep = sigmas > 0
    return sigmas[keep], torch.arange(len(sigmas))[keep]


def karras_schedule(scheduler: Scheduler, steps: int, *, prediction_type: str, rho: float = RHO) -> SigmaSchedule:
    """``steps`` Karras noise levels (Karras et al. 2022, eq. 5, ``rho``) from the largest to the smallest
    trained sigma, snapped to trained levels, plus a final 0.

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table, _ = trained_sigmas(scheduler)
    low, high = float(table[0]), float(table[-1])
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    continuous = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    if steps == 1:
        continuous = torch.tensor([high], dtype=torch.float64)
    # nearest trained level in log sigma; keep the first of repeated levels
    index = nearest_timestep(continuous, table)
    kept = [int(i) for k, i in enumerate(index) if k == 0 or int(i) != int(index[k - 1])]
    return SigmaSchedule(torch.cat([table[kept], torch.zeros(1, dtype=torch.float64)]), scheduler, prediction_type)


# ---------------------------------------------------------------------------------------------
# Steps shared by the samplers
# ---------------------------------------------------------------------------------------------


def per_sample_noise(generators: Sequence[torch.Generator]) -> NoiseSampler:
    """``noise(x)``: standard normal noise of ``x``'s shape, sample ``i`` drawn from ``generators[i]``."""

    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(x.shape[1:]), generator=g, device=x.device) for g in generators])

    return noise


def _levels(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    return torch.as_tensor(sigmas, dtype=torch.float64).tolist()


def _euler_step(
    denoiser: DenoiserFn, x: torch.Tensor, sigma: float, sigma_next: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``sigma`` to ``sigma_next``; returns
    the new x and the slope used."""
    d = (x - denoiser(x, sigma)) / sigma
    return x + d * (sigma_next - sigma), d


def _ancestral_step(
    denoiser: DenoiserFn, x: torch.Tensor, sigma: float, sigma_next: float, noise: NoiseSampler
) -> torch.Tensor:
    """One Euler-ancestral step of the reverse SDE: deterministic down to ``sigma_down``, fresh noise up to
    ``sigma_next``. With ``sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2`` this is a draw
    from the posterior ``p(x_next | x, x0 = D(x))``, i.e. the DDPM step (DDIM with eta = 1, Song et al.
    2021, eq. 16) in the variance-exploding view."""
    sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    d = (x - denoiser(x, sigma)) / sigma
    x = x + d * (sigma_down - sigma)
    return x + noise(x) * sigma_up if sigma_next > 0 else x


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def euler_sample(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    noise: NoiseSampler | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn); deterministic,
    ``noise`` unused. One step is DDIM with eta = 0 (Song et al. 2021) in the variance-exploding view."""
    levels = _levels(sigmas)
    for i in range(len(levels) - 1):
        x, _ = _euler_step(denoiser, x, levels[i], levels[i + 1])
        if callback is not None:
            callback(i + 1, len(levels) - 1)
    return x


@torch.no_grad()
def euler_ancestral_sample(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    noise: NoiseSampler | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Euler-ancestral sampling of the reverse SDE: a posterior draw at every level (see ``_ancestral_step``)."""
    levels, noise = _levels(sigmas), noise or torch.randn_like
    for i in range(len(levels) - 1):
        x = _ancestral_step(denoiser, x, levels[i], levels[i + 1], noise)
        if callback is not None:
            callback(i + 1, len(levels) - 1)
    return x


@torch.no_grad()
def heun_sample(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    noise: NoiseSampler | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1); the last step
    (to sigma 0) is Euler; deterministic, ``noise`` unused."""
    levels = _levels(sigmas)
    for i in range(len(levels) - 1):
        predicted, d = _euler_step(denoiser, x, levels[i], levels[i + 1])
        if levels[i + 1] > 0:
            # Heun's correction: the mean of the slopes at both ends
            d_next = (predicted - denoiser(predicted, levels[i + 1])) / levels[i + 1]
            x = x + (d + d_next) / 2 * (levels[i + 1] - levels[i])
        else:
            x = predicted
        if callback is not None:
            callback(i + 1, len(levels) - 1)
    return x


@torch.no_grad()
def pc_sample(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    noise: NoiseSampler | None = None,
    callback: Callback = None,
    snr: float = PC_SNR,
    corrector_steps: int = 1,
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 4 / 5): an Euler-ancestral predictor step to the
    next level, then ``corrector_steps`` Langevin corrector steps there, each with its step size set by
    ``snr`` from the per-sample norms of noise and score."""
    levels, noise = _levels(sigmas), noise or torch.randn_like
    for i in range(len(levels) - 1):
        # 1. predictor: the reverse SDE's ancestral step
        x = _ancestral_step(denoiser, x, levels[i], levels[i + 1], noise)
        sigma_next = levels[i + 1]
        for _ in range(corrector_steps if sigma_next > 0 else 0):
            # 2. corrector: Langevin dynamics at sigma_next, score = (D(x) - x) / sigma^2 (Tweedie)
            score = (denoiser(x, sigma_next) - x) / sigma_next**2
            z = noise(x)
            ratio = z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp(min=1e-12)
            step = (2.0 * (snr * ratio) ** 2).view(-1, *[1] * (x.ndim - 1))
            x = x + step * score + (2.0 * step).sqrt() * z
        if callback is not None:
            callback(i + 1, len(levels) - 1)
    return x


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    noise: NoiseSampler | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in ``t = -log sigma``; one network
    evaluation per step; deterministic, ``noise`` unused."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    old = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, float(sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -torch.log(sigmas[i]), -torch.log(sigmas[i + 1])
            h = t_next - t
            if old is None:
                estimate = denoised
            else:
                # second order from the previous step's estimate (Lu et al. 2022, eq. 10 / Alg. 2)
                r = (t - (-torch.log(sigmas[i - 1]))) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = float(sigmas[i + 1] / sigmas[i]) * x - float(torch.expm1(-h)) * estimate
        old = denoised
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x
