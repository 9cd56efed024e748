"""Score-based sampling: the trained network read as a denoiser over the noise level sigma.

Any medsynth model (DDPM with epsilon or v prediction, or rectified flow; pixel or latent; 2D or
3D) is a denoiser ``D(x, sigma) ~ E[x0 | x]`` for ``x = x0 + sigma * n`` (the variance-exploding
view of Karras et al. 2022, "EDM"):

- DDPM: ``abar = 1 / (1 + sigma^2)``, the network sees ``x_t = sqrt(abar) x``; epsilon prediction
  gives ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``, v prediction ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``;
- rectified flow: ``tau = sigma / (1 + sigma)``, the network sees ``x_t = (1 - tau) x`` and predicts
  ``v = x0 - n``, so ``x0 = x_t + tau v``.

The noise levels follow the Karras schedule (``rho = 7``) between the smallest and largest trained
sigma, each snapped to the nearest *trained* level so the network only sees timesteps it was
trained on (duplicates dropped, so very many steps give at most the trained number). The samplers
are small functions with the shared signature of :mod:`medsynth.diffusion.sampling`
(``sampler(model, x, schedule, *, generators, callback=None, **options)``, after k-diffusion):
Euler and Heun (probability-flow ODE), a predictor-corrector sampler (Euler-ancestral predictor,
Langevin corrector; Song et al. 2021) and DPM-Solver++(2M) (Lu et al. 2022). Written by hand:
MONAI ships none of these for its schedulers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.networks.schedulers import RFlowScheduler, Scheduler

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int], None] | None
RHO = 7.0
PC_SNR = 0.16  # Langevin corrector's signal-to-noise ratio (Song et al. 2021, VE models)


@dataclass
class SigmaSchedule:
    """Descending noise levels ending in 0, the trained timestep of each non-zero one, and how the
    network reads its input (``kind``: ``ddpm`` or ``rflow``; ``prediction_type``)."""

    sigmas: torch.Tensor  # float64, (steps + 1,), last 0
    timesteps: torch.Tensor  # long, (steps,): the network's timestep at sigmas[i]
    kind: str
    prediction_type: str
    num_train_timesteps: int
    clip: bool = True  # keep the denoiser's x0 in [-1, 1] (images; not latents)

    @property
    def initial_scale(self) -> float:
        """Standard deviation of x at the largest noise level for data of unit variance or less."""
        return float(torch.sqrt(1.0 + self.sigmas[0] ** 2))


def trained_sigmas(scheduler: Scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise level of every trained timestep with a non-zero one (ascending with t), float64, and
    those timesteps."""
    total = scheduler.num_train_timesteps
    timesteps = torch.arange(total)
    if isinstance(scheduler, RFlowScheduler):
        tau = timesteps.to(torch.float64) / total
        sigmas = tau / (1.0 - tau)
    else:
        abar = scheduler.alphas_cumprod.to(torch.float64)
        sigmas = torch.sqrt((1.0 - abar) / abar)
    keep = sigmas > 0
    return sigmas[keep], timesteps[keep]


def karras_schedule(scheduler: Scheduler, steps: int, *, prediction_type: str, rho: float = RHO) -> SigmaSchedule:
    """``steps`` Karras noise levels (``rho``) from the largest to the smallest trained sigma, snapped to
    trained levels, plus a final 0.

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table, trained_t = trained_sigmas(scheduler)
    low, high = float(table[0]), float(table[-1])
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    continuous = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    if steps == 1:
        continuous = torch.tensor([high], dtype=torch.float64)
    # nearest trained level in log sigma; keep the first of repeated timesteps
    index = torch.argmin((table.log()[None, :] - continuous.log()[:, None]).abs(), dim=1)
    kept = [int(i) for k, i in enumerate(index) if k == 0 or int(i) != int(index[k - 1])]
    sigmas = torch.cat([table[kept], torch.zeros(1, dtype=torch.float64)])
    timesteps = trained_t[kept].long()
    kind = "rflow" if isinstance(scheduler, RFlowScheduler) else "ddpm"
    return SigmaSchedule(sigmas, timesteps, kind, prediction_type, scheduler.num_train_timesteps)


def denoiser(
    model: Model, schedule: SigmaSchedule, *, clip: bool | None = None
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``D(x, i)``: the network's estimate of x0 from ``x = x0 + sigmas[i] n`` (see the module docstring);
    clamped to the data range ``[-1, 1]`` with ``clip`` (default: the schedule's)."""
    clip = schedule.clip if clip is None else clip

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        sigma = schedule.sigmas[i].item()
        t = schedule.timesteps[i].repeat(x.shape[0]).to(x.device)
        if schedule.kind == "rflow":
            tau = sigma / (1.0 + sigma)
            x_t = (1.0 - tau) * x
            x0 = x_t + tau * model(x_t, t).float()
        else:
            abar = 1.0 / (1.0 + sigma**2)
            x_t = abar**0.5 * x
            out = model(x_t, t).float()
            if schedule.prediction_type == "v_prediction":
                x0 = abar**0.5 * x_t - (1.0 - abar) ** 0.5 * out
            else:
                x0 = (x_t - (1.0 - abar) ** 0.5 * out) / abar**0.5
        return x0.clamp(-1.0, 1.0) if clip else x0

    return denoise


def _noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(x.shape[1:]), generator=g, device=x.device) for g in generators])


def _start(x: torch.Tensor, schedule: SigmaSchedule) -> torch.Tensor:
    return x.to(torch.float32) * schedule.initial_scale


def _euler_step(
    D: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, i: int, sigmas: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``sigmas[i]`` to ``sigmas[i + 1]``;
    returns the new x and the slope used."""
    d = (x - D(x, i)) / sigmas[i]
    return x + d * (sigmas[i + 1] - sigmas[i]), d


@torch.no_grad()
def euler_sample(
    model: Model,
    x: torch.Tensor,
    schedule: SigmaSchedule,
    *,
    generators: Sequence[torch.Generator],
    callback: Callback = None,
    clip: bool | None = None,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM Alg. 1 without churn)."""
    D, sigmas = denoiser(model, schedule, clip=clip), schedule.sigmas.tolist()
    x = _start(x, schedule)
    for i in range(len(sigmas) - 1):
        x, _ = _euler_step(D, x, i, sigmas)
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


@torch.no_grad()
def heun_sample(
    model: Model,
    x: torch.Tensor,
    schedule: SigmaSchedule,
    *,
    generators: Sequence[torch.Generator],
    callback: Callback = None,
    clip: bool | None = None,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (EDM Alg. 1); the last step (to sigma 0) is Euler."""
    D, sigmas = denoiser(model, schedule, clip=clip), schedule.sigmas.tolist()
    x = _start(x, schedule)
    for i in range(len(sigmas) - 1):
        predicted, d = _euler_step(D, x, i, sigmas)
        if sigmas[i + 1] > 0:
            d_next = (predicted - D(predicted, i + 1)) / sigmas[i + 1]
            x = x + (d + d_next) / 2 * (sigmas[i + 1] - sigmas[i])
        else:
            x = predicted
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


@torch.no_grad()
def pc_sample(
    model: Model,
    x: torch.Tensor,
    schedule: SigmaSchedule,
    *,
    generators: Sequence[torch.Generator],
    callback: Callback = None,
    clip: bool | None = None,
    snr: float = PC_SNR,
) -> torch.Tensor:
    """Predictor-corrector sampling: an Euler-ancestral predictor step (the reverse SDE's
    discretisation) to the next level, then one Langevin corrector step there with the step size set
    by ``snr`` from the per-sample norms of noise and score (Song et al. 2021, Alg. 4 / 5)."""
    D, sigmas = denoiser(model, schedule, clip=clip), schedule.sigmas.tolist()
    x = _start(x, schedule)
    dims = tuple(range(1, x.ndim))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 1. predictor: ancestral step, deterministic part down to sigma_down, fresh noise up to sigma_next
        sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - D(x, i)) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + _noise_like(x, generators) * sigma_up
            # 2. corrector: Langevin at sigma_next, score = (D(x) - x) / sigma^2
            score = (D(x, i + 1) - x) / sigma_next**2
            z = _noise_like(x, generators)
            ratio = z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp(min=1e-12)
            step = (2.0 * (snr * ratio) ** 2).view(-1, *[1] * len(dims))
            x = x + step * score + (2.0 * step).sqrt() * z
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


@torch.no_grad()
def dpmpp_2m_sample(
    model: Model,
    x: torch.Tensor,
    schedule: SigmaSchedule,
    *,
    generators: Sequence[torch.Generator],
    callback: Callback = None,
    clip: bool | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in log sigma; one network
    evaluation per step."""
    D, sigmas = denoiser(model, schedule, clip=clip), schedule.sigmas
    x = _start(x, schedule)
    old = None
    for i in range(len(sigmas) - 1):
        denoised = D(x, i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -torch.log(sigmas[i]), -torch.log(sigmas[i + 1])
            h = t_next - t
            if old is None:
                estimate = denoised
            else:
                r = (t - (-torch.log(sigmas[i - 1]))) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = float(sigmas[i + 1] / sigmas[i]) * x - float(torch.expm1(-h)) * estimate
        old = denoised
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x


SCORE_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler_sample,
    "heun": heun_sample,
    "pc": pc_sample,
    "dpmpp_2m": dpmpp_2m_sample,
}
