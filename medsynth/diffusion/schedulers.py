"""MONAI schedulers built from the config: one place that knows which scheduler serves which sampler."""

from __future__ import annotations

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

from medsynth.config import DiffusionConfig
from medsynth.diffusion.registry import SAMPLERS, sampler_mismatch
from medsynth.diffusion.score import SigmaSchedule, karras_schedule


def _schedule_args(diffusion: DiffusionConfig) -> dict:
    # MONAI's "cosine" schedule takes no beta range; the beta schedules do.
    if diffusion.schedule == "cosine":
        return {}
    return {"beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end}


def build_train_scheduler(diffusion: DiffusionConfig, *, spatial_dims: int) -> Scheduler:
    """The forward process used in training (DDPM, or rectified flow)."""
    if diffusion.scheduler == "rflow":
        # RFlowScheduler defaults to spatial_dim=3; set it for 2D (DESIGN.md pitfalls).
        return RFlowScheduler(
            num_train_timesteps=diffusion.num_train_timesteps,
            use_discrete_timesteps=True,
            sample_method="uniform",
            spatial_dim=spatial_dims,
        )
    return DDPMScheduler(
        num_train_timesteps=diffusion.num_train_timesteps,
        schedule=diffusion.schedule,
        prediction_type=diffusion.prediction_type,
        clip_sample=True,
        **_schedule_args(diffusion),
    )


def build_sampling_scheduler(
    diffusion: DiffusionConfig, *, sampler: str, steps: int, spatial_dims: int, clip: bool = True
) -> Scheduler | SigmaSchedule:
    """The reverse-process scheduler for ``sampler`` with ``steps`` inference steps; ``clip`` keeps each
    step's estimate of x0 in the data range [-1, 1] (images), off for latents, which have no such range.

    Raises:
        ValueError: a sampler that does not fit the trained process, or too many steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > diffusion.num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds diffusion.num_train_timesteps={diffusion.num_train_timesteps}")
    mismatch = sampler_mismatch(sampler, diffusion.scheduler)
    if mismatch is not None:
        raise ValueError(mismatch)
    if SAMPLERS[sampler].family == "score":  # any trained process, read as a denoiser over sigma
        schedule = karras_schedule(
            build_train_scheduler(diffusion, spatial_dims=spatial_dims),
            steps,
            prediction_type=diffusion.prediction_type,
        )
        schedule.clip = clip
        return schedule
    scheduler: Scheduler
    if sampler == "ddim":
        scheduler = DDIMScheduler(
            num_train_timesteps=diffusion.num_train_timesteps,
            schedule=diffusion.schedule,
            prediction_type=diffusion.prediction_type,
            clip_sample=True,
            **_schedule_args(diffusion),
        )
    else:  # ddpm and rflow step the training process itself
        scheduler = build_train_scheduler(diffusion, spatial_dims=spatial_dims)
    if hasattr(scheduler, "clip_sample"):
        scheduler.clip_sample = clip
    scheduler.set_timesteps(steps)
    return scheduler
