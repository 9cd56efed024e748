"""Training a MONAI ``ControlNet`` on top of a trained, frozen medsynth diffusion model: label map -> image.

The base model is frozen; the ControlNet learns the same objective as the base (same forward process,
prediction target and loss weighting, read from the base's model file) with its residuals added inside
the base UNet, through MONAI's ``ControlNetDiffusionInferer``.

Exact resume as in :mod:`medsynth.training.trainer`: data order, noise and timesteps are pure functions
of ``(seed, step)``; the checkpoint holds the rest (ControlNet, EMA, optimiser, LR scheduler, RNG
states, step). Launch with ``torchrun`` like the trainer; only the ControlNet is wrapped in DDP.
No MLflow here: metrics leave through the ``log_metrics`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.inferers import ControlNetDiffusionInferer
from monai.networks.schedulers import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from medsynth.config import Config, digest, to_plain
from medsynth.diffusion.objectives import min_snr_weights, prediction_target, sample_timesteps, weighted_mse
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.errors import MedsynthError
from medsynth.io.state import FORMAT_VERSION, load_state, rng_states, save_state, set_rng_states
from medsynth.models.controlnet import (
    CONTROLNET_FORMAT,
    build_controlnet,
    check_label_maps,
    controlnet_kwargs,
    controlnet_state,
    one_hot_labels,
)
from medsynth.models.ema import EMA
from medsynth.models.loading import TrainedModel
from medsynth.runtime import DistContext, autocast_dtype
from medsynth.training.trainer import MetricsCallback, batch_indices, lr_factor, step_generator

CONTROLNET_CHECKPOINT_FORMAT = "medsynth-controlnet-checkpoint"
GRAD_CLIP = 1.0


@dataclass
class ControlNetResult:
    steps: int
    model_path: Path
    checkpoint_path: Path
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def controlnet_identity(config: Config, *, base_sha256: str, num_labels: int, data_shape: tuple[int, ...]) -> str:
    """What must match for a checkpoint to be resumed: ControlNet config (not its cadences or the
    sampling-time scale), the EMA and optimiser settings it borrows from ``train``, seed, base model,
    labels and data shape."""
    cn = to_plain(config.controlnet)
    for key in ("resume", "log_every", "checkpoint_every", "conditioning_scale"):
        cn.pop(key)
    borrowed = {
        k: getattr(config.train, k) for k in ("ema_decay", "ema_warmup", "weight_decay", "min_lr_ratio", "precision")
    }
    return digest(
        {
            "controlnet": cn,
            "train": borrowed,
            "seed": config.seed,
            "base_sha256": base_sha256,
            "num_labels": num_labels,
            "data_shape": list(data_shape),
        }
    )


def controlnet_prediction(
    inferer: ControlNetDiffusionInferer,
    base_network: nn.Module,
    controlnet: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    null_class: int | None,
) -> torch.Tensor:
    """The base network's prediction for ``x0`` noised to ``t``, steered by the ControlNet with the
    one-hot maps ``cond``. On a class-conditional base both networks get the null class: the
    ControlNet is label-map conditioning, not class conditioning."""
    if null_class is not None:
        labels = torch.full((len(x0),), null_class, dtype=torch.long, device=x0.device)
        base_network, controlnet = partial(base_network, class_labels=labels), partial(controlnet, class_labels=labels)
    # MONAI's ControlNetDiffusionInferer.__call__ (monai 1.6) is not under torch.no_grad: it serves training.
    return inferer(
        inputs=x0, diffusion_model=base_network, controlnet=controlnet, noise=noise, timesteps=t, cn_cond=cond
    )


def controlnet_validation_loss(
    base: TrainedModel,
    controlnet: nn.Module,
    images: torch.Tensor,
    label_maps: torch.Tensor,
    *,
    num_labels: int,
    seed: int,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Plain MSE to the target with fixed noise and evenly spread timesteps (as the trainer's
    validation loss), so numbers compare across steps, runs and ControlNets."""
    device = next(base.network.parameters()).device
    scheduler = build_train_scheduler(base.diffusion, spatial_dims=base.spatial_dims)
    generator = torch.Generator(device=device).manual_seed(seed + 7)
    x0 = images.to(device)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t = (
        torch.arange(len(x0), device=device)
        * (base.diffusion.max_train_timestep or scheduler.num_train_timesteps)
        // len(x0)
    ).long()
    cond = one_hot_labels(label_maps, num_labels).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        prediction = controlnet_prediction(
            ControlNetDiffusionInferer(scheduler), base.network, controlnet, x0, cond, noise, t, base.num_classes
        )
    return float(
        weighted_mse(prediction, prediction_target(scheduler, x0, noise, t, base.diffusion.prediction_type), None)
    )


def _check_data(
    base: TrainedModel, images: np.ndarray, labels: np.ndarray, num_labels: int, split: str
) -> torch.Tensor:
    expected = (base.network.in_channels, *base.image_size)
    if images.ndim != 2 + base.spatial_dims or tuple(images.shape[1:]) != expected:
        raise MedsynthError(
            f"the {split} images have shape {tuple(images.shape)}; the base model {base.path} expects (N, {', '.join(map(str, expected))})"
        )
    if len(labels) != len(images):
        raise MedsynthError(f"the {split} data has {len(images)} images but {len(labels)} label maps")
    return check_label_maps(labels, base.image_size, num_labels, f"the {split} label maps")


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def train_controlnet(
    config: Config,
    base: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    work_dir: Path,
    ctx: DistContext,
    *,
    num_labels: int,
    base_sha256: str,
    log_metrics: MetricsCallback = None,
    step_callback: Callable[[int], None] | None = None,
) -> ControlNetResult:
    """Train a ControlNet that steers the frozen ``base`` with label maps.

    Args:
        config: the resolved config (``controlnet``; EMA, weight decay, LR floor and precision from ``train``; ``seed``).
        base: the trained diffusion model (pixel space); it is frozen, not modified.
        images: training images ``(N, C, *image_size)`` in [-1, 1], as the base was trained on.
        labels: their label maps ``(N, 1, *image_size)``, integers ``0..num_labels-1``.
        val_images: held-out images for the final validation loss (may be empty).
        val_labels: their label maps.
        work_dir: where ``checkpoints/last.pt`` and ``controlnet.pt`` are written (rank 0 only).
        ctx: the process group context (single process: rank 0 of 1).
        num_labels: number of labels (the one-hot channels of the conditioning).
        base_sha256: the base model file's digest, stored with the ControlNet and part of the resume identity.
        log_metrics: called with ``({name: value}, step)`` on rank 0.
        step_callback: called after every completed (and, when due, checkpointed) step.

    Returns:
        The paths of the final checkpoint and ``controlnet.pt``, and the metric history.
    """
    cfg, device = config.controlnet, ctx.device
    if cfg.batch_size % ctx.world_size:
        raise MedsynthError(
            f"controlnet.batch_size {cfg.batch_size} is not divisible by the {ctx.world_size} processes"
        )
    maps = _check_data(base, images, labels, num_labels, "training")
    has_val = val_images is not None and len(val_images) > 0
    val_maps = (
        _check_data(base, val_images, val_labels, num_labels, "validation")[: config.train.val_images]
        if has_val
        else None
    )
    amp_dtype = autocast_dtype(config.train.precision, device)
    checkpoint_path = work_dir / "checkpoints" / "last.pt"

    # 1. frozen base, ControlNet (a copy of the base encoder: same on every rank), EMA, optimiser, schedules
    base.network.to(device).eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    model = build_controlnet(base, num_labels, cfg).to(device)
    kwargs = controlnet_kwargs(base, num_labels, cfg)
    ema = EMA(model, decay=config.train.ema_decay, warmup=config.train.ema_warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=config.train.weight_decay)
    warmup = min(50, cfg.max_steps // 10)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=cfg.max_steps, floor=config.train.min_lr_ratio)
    )
    scheduler: Scheduler = build_train_scheduler(base.diffusion, spatial_dims=base.spatial_dims)
    inferer = ControlNetDiffusionInferer(scheduler)
    identity = controlnet_identity(
        config, base_sha256=base_sha256, num_labels=num_labels, data_shape=tuple(images.shape)
    )

    # 2. resume
    start, history, resumed_from = 0, [], None
    if cfg.resume and checkpoint_path.is_file():
        state = load_state(checkpoint_path, expected_format=CONTROLNET_CHECKPOINT_FORMAT)
        if state["identity"] != identity:
            raise MedsynthError(
                f"{checkpoint_path}: was trained with a different controlnet config, seed, base model or data; cannot resume"
            )
        model.load_state_dict(state["controlnet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_states(state["rng"])
        start, history, resumed_from = int(state["step"]), list(state["history"]), int(state["step"])

    net = DistributedDataParallel(model) if ctx.distributed else model
    data = torch.as_tensor(images, dtype=torch.float32)
    val = None if val_maps is None else torch.as_tensor(val_images[: config.train.val_images], dtype=torch.float32)

    def checkpoint(step: int) -> None:
        if not ctx.is_main:
            return
        save_state(
            checkpoint_path,
            {
                "format": CONTROLNET_CHECKPOINT_FORMAT,
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "step": step,
                "controlnet": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "rng": rng_states(),
                "history": history,
            },
        )

    # 3. loop
    window_loss, window_images, window_start = [], 0, time.perf_counter()
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc="controlnet",
        unit="step",
        disable=None if ctx.is_main else True,
        dynamic_ncols=True,
    )
    completed, updating = start, False
    try:
        for step in range(start, cfg.max_steps):
            model.train()
            # Every rank draws the whole global batch's indices, noise and timesteps and keeps its share.
            shard = slice(ctx.rank, None, ctx.world_size)
            index = batch_indices(step, cfg.batch_size, len(data), config.seed)[shard]
            x0 = data[index].to(device)
            cond = one_hot_labels(maps[index], num_labels).to(device)
            generator = step_generator(config.seed, step, device)
            noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=generator, device=device)[shard]
            t = sample_timesteps(
                scheduler, cfg.batch_size, generator=generator, device=device, high=base.diffusion.max_train_timestep
            )[shard]

            # 1. predict (epsilon | v | velocity) with the ControlNet's residuals inside the frozen base
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                prediction = controlnet_prediction(inferer, base.network, net, x0, cond, noise, t, base.num_classes)
            # 2. the base's objective: (Min-SNR-weighted) regression to its target
            target = prediction_target(scheduler, x0, noise, t, base.diffusion.prediction_type)
            loss = weighted_mse(
                prediction,
                target,
                min_snr_weights(scheduler, t, base.diffusion.prediction_type, base.diffusion.min_snr_gamma),
            )
            if not torch.isfinite(loss):
                raise MedsynthError(
                    f"controlnet training diverged at step {step} (loss {loss.item()}); lower controlnet.lr"
                )
            # 3. update the ControlNet, LR, EMA
            updating = True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            lr_scheduler.step()
            ema.update(model)
            completed, updating = step + 1, False

            done = completed
            window_loss.append(loss.item())
            window_images += len(x0) * ctx.world_size
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "controlnet/loss": float(np.mean(window_loss)),
                    "controlnet/lr": optimizer.param_groups[0]["lr"],
                    "controlnet/images_per_s": window_images / max(elapsed, 1e-9),
                }
                if done == cfg.max_steps and val is not None:
                    record["controlnet/val_loss"] = (
                        controlnet_validation_loss(
                            base,
                            ema.shadow,
                            val,
                            val_maps,
                            num_labels=num_labels,
                            seed=config.seed,
                            amp_dtype=amp_dtype,
                        )
                        if ctx.is_main
                        else float("nan")
                    )
                history.append({"step": done, **record})
                if ctx.is_main and log_metrics is not None:
                    log_metrics(record, done)
                bar.set_postfix(loss=f"{record['controlnet/loss']:.4f}")
                window_loss, window_images, window_start = [], 0, time.perf_counter()
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                checkpoint(done)
            bar.update(1)
            if step_callback is not None:
                step_callback(done)
    except KeyboardInterrupt:
        # As in the trainer: between steps, checkpoint the last completed one; mid-update the periodic one stands.
        if not updating and completed > start:
            checkpoint(completed)
        raise
    finally:
        bar.close()

    # 4. controlnet.pt: EMA weights plus how to rebuild and use them
    model_path = work_dir / "controlnet.pt"
    if ctx.is_main:
        save_state(
            model_path,
            {
                "format": CONTROLNET_FORMAT,
                "format_version": FORMAT_VERSION,
                **controlnet_state(
                    ema.shadow,
                    kwargs=kwargs,
                    spatial_dims=base.spatial_dims,
                    num_labels=num_labels,
                    image_size=base.image_size,
                    step=cfg.max_steps,
                    base_sha256=base_sha256,
                ),
            },
        )
    return ControlNetResult(
        steps=cfg.max_steps,
        model_path=model_path,
        checkpoint_path=checkpoint_path,
        history=history,
        resumed_from=resumed_from,
    )
