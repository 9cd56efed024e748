"""Training a MONAI ``ControlNet`` on top of a trained, frozen medsynth diffusion model: label map -> image.

The base model is frozen; the ControlNet learns the same objective as the base (same forward process,
prediction target and loss weighting, read from the base's model file) with its residuals added inside
the base UNet, through MONAI's ``ControlNetDiffusionInferer``. Run by the one training loop
(:func:`medsynth.training.engine.fit`); only the ControlNet is wrapped in DDP under ``torchrun``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.inferers import ControlNetDiffusionInferer
from monai.networks.schedulers import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medsynth.config import ControlNetConfig, result_view
from medsynth.diffusion.objectives import min_snr_weights, prediction_target, sample_timesteps, weighted_mse
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.errors import MedsynthError
from medsynth.io.state import FORMAT_VERSION, save_state
from medsynth.models.controlnet import (
    CONTROLNET_FORMAT,
    build_controlnet,
    check_label_maps,
    controlnet_kwargs,
    controlnet_state,
    one_hot_labels,
)
from medsynth.models.loading import TrainedModel
from medsynth.runtime import autocast_dtype
from medsynth.training.engine import Cadence, Optimised, RunSettings, Trainer, default_warmup, fit

CONTROLNET_CHECKPOINT_FORMAT = "medsynth-controlnet-checkpoint"


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
            f"the {split} images have shape {tuple(images.shape)}; the base model {base.path} expects "
            f"(N, {', '.join(map(str, expected))})"
        )
    if len(labels) != len(images):
        raise MedsynthError(f"the {split} data has {len(images)} images but {len(labels)} label maps")
    return check_label_maps(labels, base.image_size, num_labels, f"the {split} label maps")


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class ControlNetTrainer(Trainer):
    """One step: the frozen base's prediction for the noised batch with the ControlNet's residuals, regressed
    to the base's target with its (Min-SNR) weighting; the EMA ControlNet is validated at the end."""

    checkpoint_format = CONTROLNET_CHECKPOINT_FORMAT

    def __init__(
        self,
        cfg: ControlNetConfig,
        base: TrainedModel,
        images: np.ndarray,
        labels: np.ndarray,
        val_images: np.ndarray | None,
        val_labels: np.ndarray | None,
        run: RunSettings,
        *,
        num_labels: int,
        base_sha256: str,
    ) -> None:
        self.cfg, self.base, self.run, self.num_labels = cfg, base, run, num_labels
        device = self.device = run.dist.device
        self.maps = _check_data(base, images, labels, num_labels, "training")
        has_val = val_images is not None and len(val_images) > 0
        self.val_maps = (
            _check_data(base, val_images, val_labels, num_labels, "validation")[: cfg.val_images] if has_val else None
        )
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.view = {
            "controlnet": result_view(cfg, exclude=ControlNetConfig.SAMPLING_KEYS),
            "seed": run.seed,
            "base_sha256": base_sha256,
            "num_labels": num_labels,
            "data_shape": list(images.shape),
        }
        self.dataset_size = len(images)

        # frozen base, ControlNet (a copy of the base encoder: same on every rank), EMA, optimiser, schedule
        base.network.to(device).eval().requires_grad_(False)
        torch.manual_seed(run.seed)
        self.model = build_controlnet(base, num_labels, cfg).to(device)
        self.kwargs = controlnet_kwargs(base, num_labels, cfg)
        self.group = Optimised(
            "controlnet",
            self.model,
            lr=cfg.lr,
            lr_key="controlnet.lr",
            weight_decay=cfg.weight_decay,
            total=cfg.max_steps,
            warmup=default_warmup(cfg.warmup_steps, cfg.max_steps),
            floor=cfg.min_lr_ratio,
            grad_clip=cfg.grad_clip,
            ema_decay=cfg.ema_decay,
            ema_warmup=cfg.ema_warmup,
        )
        self.groups = [self.group]
        self.scheduler: Scheduler = build_train_scheduler(base.diffusion, spatial_dims=base.spatial_dims)
        self.inferer = ControlNetDiffusionInferer(self.scheduler)
        self.net = DistributedDataParallel(self.model) if run.dist.distributed else self.model
        self.data = torch.as_tensor(images, dtype=torch.float32)
        self.val = None if self.val_maps is None else torch.as_tensor(val_images[: cfg.val_images], dtype=torch.float32)

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        base, device = self.base, self.device
        mine = index[shard]
        x0 = self.data[mine].to(device)
        cond = one_hot_labels(self.maps[mine], self.num_labels).to(device)
        noise = torch.randn((len(index), *x0.shape[1:]), generator=generator, device=device)[shard]
        t = sample_timesteps(
            self.scheduler, len(index), generator=generator, device=device, high=base.diffusion.max_train_timestep
        )[shard]
        # 1. predict (epsilon | v | velocity) with the ControlNet's residuals inside the frozen base
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            prediction = controlnet_prediction(
                self.inferer, base.network, self.net, x0, cond, noise, t, base.num_classes
            )
        # 2. the base's objective: (Min-SNR-weighted) regression to its target
        target = prediction_target(self.scheduler, x0, noise, t, base.diffusion.prediction_type)
        weights = min_snr_weights(self.scheduler, t, base.diffusion.prediction_type, base.diffusion.min_snr_gamma)
        return {"loss": weighted_mse(prediction, target, weights)}

    def train_mode(self) -> None:
        self.model.train()

    def validation_names(self) -> tuple[str, ...]:
        return ("val/loss",) if self.val is not None else ()

    def validate(self, step: int) -> dict[str, float]:
        if self.val is None:
            return {}
        loss = controlnet_validation_loss(
            self.base,
            self.group.ema.shadow,
            self.val,
            self.val_maps,
            num_labels=self.num_labels,
            seed=self.run.seed,
            amp_dtype=self.amp_dtype,
        )
        return {"val/loss": loss}


def train_controlnet(
    cfg: ControlNetConfig,
    base: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    val_images: np.ndarray | None,
    val_labels: np.ndarray | None,
    run: RunSettings,
    *,
    num_labels: int,
    base_sha256: str,
) -> ControlNetResult:
    """Train a ControlNet that steers the frozen ``base`` with label maps.

    Args:
        cfg: the controlnet section.
        base: the trained diffusion model (pixel space); it is frozen, not modified.
        images: training images ``(N, C, *image_size)`` in [-1, 1], as the base was trained on.
        labels: their label maps ``(N, 1, *image_size)``, integers ``0..num_labels-1``.
        val_images: held-out images for the final validation loss (may be empty); ``val_labels``: their maps.
        run: seed, work folder (``checkpoints/last.pt`` and ``controlnet.pt``, rank 0), process group, callbacks.
        num_labels: number of labels (the one-hot channels of the conditioning).
        base_sha256: the base model file's digest, stored with the ControlNet and part of the resume identity.

    Returns:
        The paths of the final checkpoint and ``controlnet.pt``, and the metric history.
    """
    if run.work_dir is None:
        raise ValueError("train_controlnet needs run.work_dir (where controlnet.pt is written)")
    trainer = ControlNetTrainer(
        cfg, base, images, labels, val_images, val_labels, run, num_labels=num_labels, base_sha256=base_sha256
    )
    cadence = Cadence(
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        resume=cfg.resume,
    )
    result = fit(trainer, cadence, run)

    # controlnet.pt: EMA weights plus how to rebuild and use them
    model_path = run.work_dir / "controlnet.pt"
    if run.dist.is_main:
        save_state(
            model_path,
            {
                "format": CONTROLNET_FORMAT,
                "format_version": FORMAT_VERSION,
                **controlnet_state(
                    trainer.group.ema.shadow,
                    kwargs=trainer.kwargs,
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
        checkpoint_path=run.checkpoint_path,
        history=result.history,
        resumed_from=result.resumed_from,
    )
