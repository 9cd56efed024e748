"""Reverse-process samplers over MONAI schedulers (DDPM, DDIM, rectified flow) and :func:`generate`,
the one entry point for every sampler of :mod:`medsynth.diffusion.registry`.

The MONAI-scheduler samplers step the raw network output in the scheduler's discrete time, after
k-diffusion's shape: ``sampler(model, x, scheduler, *, generators, callback=None, **options) -> x0``;
the score-based ones of :mod:`medsynth.diffusion.score` are lists of noise levels over the network
read as a denoiser (:class:`~medsynth.diffusion.denoiser.Denoiser`). ``x`` is the initial noise;
``generators`` holds one ``torch.Generator`` per sample so that sample ``i`` depends only on its
own seed, not on which batch it was drawn in. ``callback(step, total)`` reports progress; no logging
lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

from medsynth.diffusion.denoiser import Model, ddpm_x0, guided
from medsynth.diffusion.registry import SAMPLER_NAMES, SAMPLERS
from medsynth.diffusion.score import Callback, SigmaSchedule, per_sample_noise


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``(len(generators), *shape)``, one generator per sample."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in generators])


def _per_sample_step(
    step: Callable, model_output, timestep, x, generators, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    # MONAI's step() draws one noise tensor for the whole batch from one generator; stepping sample by
    # sample (cheap next to the network) keeps each sample's noise tied to its own generator.
    prev, x0 = zip(
        *(
            step(model_output[i : i + 1], timestep, x[i : i + 1], generator=g, **kwargs)
            for i, g in enumerate(generators)
        )
    )
    return torch.cat(prev), torch.cat(x0)


def ddpm_step(
    chain: DDPMScheduler,
    model_output: torch.Tensor,
    timestep: int,
    x: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's ``DDPMScheduler.step`` over the whole batch, each sample's noise from its own generator.

    MONAI's step draws the batch's noise from one generator; stepping it sample by sample keeps each
    sample tied to its seed but costs one small call per sample and step, which is most of the
    sampling time on a GPU. This is MONAI's arithmetic in MONAI's order (Ho et al. 2020, eqs. 6, 7,
    15), so the result is bit for bit that of the per-sample calls (tested); learned variances, which
    no medsynth model has, take the per-sample MONAI call.
    """
    if chain.variance_type not in ("fixed_small", "fixed_large") or model_output.shape[1] != x.shape[1]:
        return _per_sample_step(chain.step, model_output, timestep, x, generators)
    alpha_prod_t = chain.alphas_cumprod[timestep]
    alpha_prod_t_prev = chain.alphas_cumprod[timestep - 1] if timestep > 0 else chain.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    x0 = ddpm_x0(model_output, x, alpha_prod_t, chain.prediction_type)
    if chain.clip_sample:
        x0 = torch.clamp(x0, chain.clip_sample_values[0], chain.clip_sample_values[1])
    x0_coeff = (alpha_prod_t_prev ** (0.5) * chain.betas[timestep]) / beta_prod_t
    sample_coeff = chain.alphas[timestep] ** (0.5) * beta_prod_t_prev / beta_prod_t
    prev = x0_coeff * x0 + sample_coeff * x
    if timestep > 0:
        shape = (1, *model_output.shape[1:])
        noise = torch.cat(
            [
                torch.randn(
                    shape, dtype=model_output.dtype, layout=model_output.layout, generator=g, device=model_output.device
                )
                for g in generators
            ]
        )
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * chain.betas[timestep]
        variance = torch.clamp(variance, min=1e-20) if chain.variance_type == "fixed_small" else chain.betas[timestep]
        prev = prev + (variance**0.5) * noise
    return prev, x0


def respaced_ddpm(scheduler: DDPMScheduler, steps: int) -> tuple[DDPMScheduler, torch.Tensor]:
    """A DDPM scheduler over ``steps`` of the trained timesteps, with betas recomputed between them.

    MONAI's ``DDPMScheduler.step`` assumes consecutive timesteps (it steps t -> t-1), so sampling in
    fewer steps than trained needs the respacing of Nichol & Dhariwal 2021 ("Improved DDPM", sec. 4):
    ``beta'_i = 1 - abar(t_i) / abar(t_{i-1})`` over the kept timesteps. Returns the respaced scheduler
    (indexed 0..steps-1) and the original timesteps that the network sees, in descending order.
    """
    total = scheduler.num_train_timesteps
    kept = torch.linspace(total - 1, 0, steps).round().long().flip(0)  # ascending
    abar = scheduler.alphas_cumprod[kept]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    respaced = DDPMScheduler(
        num_train_timesteps=steps, prediction_type=scheduler.prediction_type, clip_sample=scheduler.clip_sample
    )
    respaced.betas = 1.0 - abar / abar_prev
    respaced.alphas = 1.0 - respaced.betas
    respaced.alphas_cumprod = abar
    respaced.set_timesteps(steps)
    return respaced, kept.flip(0)


@torch.no_grad()
def ddpm_sample(
    model: Model,
    x: torch.Tensor,
    scheduler: Scheduler,
    *,
    generators: Sequence[torch.Generator],
    callback: Callback = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), respaced when fewer steps than trained."""
    assert isinstance(scheduler, DDPMScheduler)
    steps = len(scheduler.timesteps)
    if steps == scheduler.num_train_timesteps:
        chain, model_times = scheduler, scheduler.timesteps
    else:
        chain, model_times = respaced_ddpm(scheduler, steps)
    for i, (index, t) in enumerate(zip(chain.timesteps, model_times)):
        # 1. predict (epsilon | v) at the original timestep the network was trained on
        output = model(x, t.repeat(x.shape[0]).to(x.device))
        # 2. step x_t -> x_{t-1} on the (respaced) chain
        x, _ = ddpm_step(chain, output.float(), int(index), x, generators)
        if callback is not None:
            callback(i + 1, steps)
    return x


@torch.no_grad()
def ddim_sample(
    model: Model,
    x: torch.Tensor,
    scheduler: Scheduler,
    *,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    callback: Callback = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12); deterministic for ``eta=0``."""
    assert isinstance(scheduler, DDIMScheduler)
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        # 1. predict (epsilon | v)
        output = model(x, t.repeat(x.shape[0]).to(x.device))
        # 2. step x_t -> x_{t-Δ}
        if eta > 0:
            x, _ = _per_sample_step(scheduler.step, output.float(), int(t), x, generators, eta=eta)
        else:
            x, _ = scheduler.step(output.float(), int(t), x, eta=0.0)
        if callback is not None:
            callback(i + 1, steps)
    return x


@torch.no_grad()
def rflow_sample(
    model: Model,
    x: torch.Tensor,
    scheduler: Scheduler,
    *,
    generators: Sequence[torch.Generator],
    callback: Callback = None,
) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE (Liu et al. 2022) from noise (t=T) to data (t=0)."""
    assert isinstance(scheduler, RFlowScheduler)
    timesteps = scheduler.timesteps
    next_timesteps = torch.cat([timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)])
    for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps)):
        # 1. predict the velocity
        output = model(x, t.repeat(x.shape[0]).to(x.device))
        # 2. Euler step x_t -> x_{t_next}
        x, _ = scheduler.step(output.float(), t, x, t_next)
        if callback is not None:
            callback(i + 1, len(timesteps))
    return x


def generate(
    model: torch.nn.Module,
    scheduler: Scheduler | SigmaSchedule,
    *,
    sampler: str,
    image_shape: Sequence[int],
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device,
    eta: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    callback: Callback = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    network_wrapper: Callable[[torch.nn.Module, slice], Callable[..., torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Draw ``len(seeds)`` samples of ``image_shape`` (channels first), batch by batch, on ``device``.

    ``scheduler`` comes from :func:`~medsynth.diffusion.schedulers.build_sampling_scheduler` for
    ``sampler``: a MONAI scheduler, or the noise levels of a score-based sampler. Sample ``i`` starts
    from noise drawn with ``seeds[i]`` and uses its own generator for every stochastic step.
    Class-conditional models need ``class_labels`` (one per sample) and take a classifier-free
    ``guidance_scale`` (see :func:`~medsynth.diffusion.denoiser.guided`). ``network_wrapper(model,
    batch)`` may wrap the network for one batch (``batch``: the samples' slice; the wrapper is called
    like the network, ``(x, timesteps=t, **kwargs)``, with a doubled batch under guidance), e.g. to add
    ControlNet residuals from each sample's label map.
    Returns a CPU float tensor ``(N, *image_shape)``.

    Raises:
        ValueError: an unknown sampler name, a scheduler not built for it, class labels for an
            unconditional model or the reverse.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}' (allowed: {', '.join(SAMPLER_NAMES)})")
    spec = SAMPLERS[sampler]
    if (spec.family == "score") != isinstance(scheduler, SigmaSchedule):
        raise ValueError(f"sampler '{sampler}' does not run on a {type(scheduler).__name__} (build_sampling_scheduler)")
    sample_fn = spec.load()
    options = {name: {"eta": eta}[name] for name in spec.options}  # the options this sampler takes
    model.eval()
    embeds = getattr(model, "num_class_embeds", None)
    if embeds is not None and class_labels is None:
        raise ValueError("a class-conditional model needs class labels to sample")
    if class_labels is not None and len(class_labels) != len(seeds):
        raise ValueError(f"{len(class_labels)} class labels for {len(seeds)} samples")
    if class_labels is not None and embeds is not None and any(not 0 <= int(c) < embeds - 1 for c in class_labels):
        raise ValueError(f"class labels must lie in 0..{embeds - 2}")

    steps_per_batch = len(scheduler.timesteps)
    total_batches = (len(seeds) + batch_size - 1) // batch_size
    out = []
    for b in range(total_batches):
        batch_seeds = seeds[b * batch_size : (b + 1) * batch_size]
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in batch_seeds]
        x = initial_noise(image_shape, generators, device)
        labels = (
            None
            if class_labels is None
            else torch.as_tensor([int(c) for c in class_labels[b * batch_size : (b + 1) * batch_size]], device=device)
        )
        base = (
            model
            if network_wrapper is None
            else network_wrapper(model, slice(b * batch_size, b * batch_size + len(batch_seeds)))
        )
        inner = guided(
            base, class_labels=labels, null_class=None if embeds is None else embeds - 1, guidance_scale=guidance_scale
        )

        def network(x: torch.Tensor, t: torch.Tensor, _inner: Model = inner) -> torch.Tensor:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return _inner(x, t)

        def report(step: int, _total: int, _b: int = b) -> None:
            if callback is not None:
                callback(_b * steps_per_batch + step, total_batches * steps_per_batch)

        if isinstance(scheduler, SigmaSchedule):
            # the unit initial noise read as x_T of the trained process, in the variance-exploding view
            x = sample_fn(
                scheduler.denoiser(network),
                x.to(torch.float32) * scheduler.initial_scale,
                scheduler.sigmas,
                noise=per_sample_noise(generators),
                callback=report,
            )
        else:
            x = sample_fn(network, x, scheduler, generators=generators, callback=report, **options)
        out.append(x.float().cpu())
    return torch.cat(out)
