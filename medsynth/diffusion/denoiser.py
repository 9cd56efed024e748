"""The trained network read once as a denoiser over a continuous noise level sigma.

Any medsynth model (DDPM with epsilon or v prediction, or rectified flow; pixel or latent; 2D or 3D)
is a denoiser ``D(x, sigma) ~ E[x0 | x]`` for ``x = x0 + sigma * n``, the variance-exploding view of
Karras et al. 2022 ("EDM", sec. 2 and Table 1); the wrapper has the shape of k-diffusion's
``external.py`` (``DiscreteEpsDDPMDenoiser``, ``DiscreteVDDPMDenoiser``):

- DDPM: ``abar = 1 / (1 + sigma^2)``; the network sees ``x_t = sqrt(abar) x`` (``c_in``); epsilon
  prediction gives ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (Ho et al. 2020, eq. 15),
  v prediction ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v`` (Salimans & Ho 2022);
- rectified flow: ``tau = sigma / (1 + sigma)``; the network sees ``x_t = (1 - tau) x`` and predicts
  MONAI's velocity ``v = x0 - n``, so ``x0 = x_t + tau v`` (Liu et al. 2022).

The network is evaluated at the trained timestep nearest to sigma in log sigma: it was trained on
those discrete timesteps only. The samplers in :mod:`medsynth.diffusion.score` and the denoising
prior (:mod:`medsynth.denoise.prior`) are lists of sigmas over this one wrapper. The MONAI-scheduler
samplers step the raw network output in discrete time: DDIM and rectified flow through MONAI's own
``step``, DDPM's batched step through :func:`ddpm_x0` here.

Conditioning is bound into the network before it is wrapped (:func:`guided`): class labels,
classifier-free guidance and network wrappers such as ControlNet residuals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.networks.schedulers import RFlowScheduler, Scheduler

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(x_t, timesteps) -> raw network output
Scalar = float | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Noise levels of the trained timesteps, and the x0 estimate from the network output
# ---------------------------------------------------------------------------------------------


def timestep_sigmas(scheduler: Scheduler) -> torch.Tensor:
    """The noise level sigma of every trained timestep ``0..T-1`` (float64, ascending with t).

    DDPM: the noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` of ``x_t``; rectified flow (MONAI's
    ``tau = t / T``): ``tau / (1 - tau)``, which is 0 at ``t = 0``.
    """
    if isinstance(scheduler, RFlowScheduler):
        tau = torch.arange(scheduler.num_train_timesteps, dtype=torch.float64) / scheduler.num_train_timesteps
        return tau / (1.0 - tau)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    return torch.sqrt((1.0 - abar) / abar)


def nearest_timestep(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the level in ``table`` (from :func:`timestep_sigmas`) nearest to each ``sigma`` in log
    sigma (long, ``sigma``'s shape); sigma 0 maps to the smallest level."""
    tiny = torch.finfo(torch.float64).tiny
    log_table = table.to(torch.float64).clamp(min=tiny).log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=tiny).log()
    return (log_table[None, :] - log_sigma.reshape(-1, 1)).abs().argmin(dim=1).reshape(log_sigma.shape)


def input_scale(scheduler: Scheduler, sigma: Scalar) -> Scalar:
    """``c_in``: the factor that turns ``x = x0 + sigma n`` into the network's input ``x_t`` at the matching
    time, ``sqrt(abar) = 1 / sqrt(1 + sigma^2)`` for DDPM and ``1 - tau = 1 / (1 + sigma)`` for rectified flow."""
    if isinstance(scheduler, RFlowScheduler):
        return 1.0 / (1.0 + sigma)
    return (1.0 + sigma**2) ** -0.5


def ddpm_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: Scalar, prediction_type: str) -> torch.Tensor:
    """The estimate of x0 from a DDPM network's output at ``x_t`` with cumulative ``alpha_bar``.

    In MONAI's ``DDPMScheduler.step`` order of operations (Ho et al. 2020, eq. 15; Salimans & Ho 2022),
    so a stepper that uses it stays bit for bit MONAI's.

    Raises:
        ValueError: an unknown prediction type.
    """
    beta = 1 - alpha_bar
    if prediction_type == "epsilon":
        return (x_t - beta ** (0.5) * output) / alpha_bar ** (0.5)
    if prediction_type == "v_prediction":
        return (alpha_bar**0.5) * x_t - (beta**0.5) * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction_type '{prediction_type}' (allowed: epsilon, v_prediction, sample)")


def rflow_x0(output: torch.Tensor, x_t: torch.Tensor, tau: Scalar) -> torch.Tensor:
    """The estimate of x0 from a rectified-flow network's velocity ``x0 - n`` at ``x_t = (1 - tau) x0 + tau n``."""
    return x_t + tau * output


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------


def guided(
    model: Callable[..., torch.Tensor],
    *,
    class_labels: torch.Tensor | None,
    null_class: int | None,
    guidance_scale: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> Model:
    """The network (called like MONAI's ``DiffusionModelUNet``, ``model(x, timesteps=t, **kwargs)``) as
    ``f(x, t)``, with its conditioning bound.

    Class-conditional models get ``class_labels`` (one per sample); with classifier-free guidance
    (Ho & Salimans 2022) the output is ``f(x, t, null) + w (f(x, t, c) - f(x, t, null))``, with both
    halves in one doubled batch. ``w = 1`` is the plain conditional model (one evaluation), ``w = 0``
    the unconditional one. The combination is linear in the output, so it holds for epsilon, v and
    velocity prediction alike. Without ``class_labels`` but with a ``null_class`` the model runs as its
    unconditional self on batches of any size (e.g. the windows of a sliding-window inferer).
    ``extra`` holds further keyword arguments for the network.
    """
    extra = extra or {}
    if class_labels is None:
        if null_class is None:
            return lambda x, t: model(x, timesteps=t, **extra)
        return lambda x, t: model(
            x, timesteps=t, class_labels=torch.full((len(x),), null_class, dtype=torch.long, device=x.device), **extra
        )
    if null_class is None:
        raise ValueError("class labels given to a model that is not class-conditional")
    null = torch.full_like(class_labels, null_class)
    if guidance_scale == 1.0:
        return lambda x, t: model(x, timesteps=t, class_labels=class_labels, **extra)
    if guidance_scale == 0.0:
        return lambda x, t: model(x, timesteps=t, class_labels=null, **extra)

    def cfg(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        both = model(
            torch.cat([x, x]), timesteps=torch.cat([t, t]), class_labels=torch.cat([class_labels, null]), **doubled
        )
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return cfg


# ---------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------


class Denoiser:
    """``D(x, sigma)``: a trained network's estimate of x0 from ``x = x0 + sigma * n`` (module docstring).

    Args:
        model: the network as ``f(x_t, timesteps)`` with its conditioning bound (:func:`guided`).
        scheduler: the MONAI scheduler it was trained with (``DDPMScheduler`` or ``RFlowScheduler``).
        prediction_type: ``epsilon`` or ``v_prediction`` (DDPM; default: the scheduler's); rectified
            flow always predicts the velocity.
        clip: keep the x0 estimate in the data range ``[-1, 1]`` (images; not latents, which have none).
    """

    def __init__(
        self, model: Model, scheduler: Scheduler, *, prediction_type: str | None = None, clip: bool = True
    ) -> None:
        self.model = model
        self.scheduler = scheduler
        self.process = "rflow" if isinstance(scheduler, RFlowScheduler) else "ddpm"
        self.prediction_type = "velocity" if self.process == "rflow" else prediction_type or scheduler.prediction_type
        self.clip = clip
        self.sigmas = timestep_sigmas(scheduler)  # float64, (T,), the level of each trained timestep

    def sigma_to_t(self, sigma: Scalar) -> torch.Tensor:
        """The trained timestep nearest to ``sigma`` in log sigma (long, ``sigma``'s shape)."""
        return nearest_timestep(torch.as_tensor(sigma, dtype=torch.float64).cpu(), self.sigmas)

    def t_to_sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """The noise level of trained timestep(s) ``t`` (float64)."""
        return self.sigmas[torch.as_tensor(t, dtype=torch.long)]

    def __call__(self, x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
        """The x0 estimate at noise level ``sigma``: a number for the whole batch, or one per sample."""
        t = self.sigma_to_t(sigma).reshape(-1).expand(x.shape[0]).to(x.device)
        if isinstance(sigma, torch.Tensor):
            # one level per sample: the scalings as (B, 1, ...) tensors, computed in float64
            sigma = sigma.to(torch.float64).reshape(-1, *[1] * (x.ndim - 1)).to(x.device)
        c_in = input_scale(self.scheduler, sigma)
        x_t = _like(c_in, x) * x
        output = self.model(x_t, t).float()
        if self.process == "rflow":
            x0 = rflow_x0(output, x_t, _like(1.0 - c_in, x))  # tau = 1 - c_in
        else:
            x0 = ddpm_x0(output, x_t, _like(c_in**2, x), self.prediction_type)  # abar = c_in^2
        return x0.clamp(-1.0, 1.0) if self.clip else x0


def _like(value: Scalar, x: torch.Tensor) -> Scalar:
    """A python number as it is; a float64 scaling tensor in ``x``'s dtype."""
    return value.to(x.dtype) if isinstance(value, torch.Tensor) else value
