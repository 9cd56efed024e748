"""The diffusion trainer: MONAI ``DiffusionModelUNet`` + scheduler through ``DiffusionInferer``, run by the
one training loop (:func:`medsynth.training.engine.fit`), which owns resume, cadence, optimisation and
progress. This module supplies the network, one step (noise, timesteps, label dropout, the (Min-SNR-weighted)
regression to the prediction target), the validation loss and the model file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from torch.nn.parallel import DistributedDataParallel

from medsynth.config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig, result_view, to_plain
from medsynth.data.patches import ImageSet, PatchSet
from medsynth.diffusion.objectives import min_snr_weights, prediction_target, sample_timesteps, weighted_mse
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.errors import MedsynthError
from medsynth.io.state import CHECKPOINT_FORMAT, FORMAT_VERSION, MODEL_FORMAT, save_state
from medsynth.models.unet import build_unet, enable_gradient_checkpointing, unet_kwargs
from medsynth.runtime import autocast_dtype
from medsynth.training.engine import Cadence, Optimised, RunSettings, Trainer, fit


@dataclass
class TrainResult:
    steps: int
    model_path: Path
    checkpoint_path: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def check_classes(classes: np.ndarray | None, count: int, num_classes: int, split: str) -> np.ndarray:
    """Class labels for a class-conditional model: one per image, each in 0..K-1."""
    if classes is None or len(classes) != count:
        raise MedsynthError(f"model.num_classes is set but the {split} data has no class label per image")
    classes = np.asarray(classes, dtype=np.int64)
    bad = sorted(set(classes[(classes < 0) | (classes >= num_classes)].tolist()))
    if bad:
        what = "images without a class label (-1)" if bad == [-1] else f"class labels {bad[:5]}"
        raise MedsynthError(
            f"the {split} data has {what}; model.num_classes={num_classes} needs labels 0..{num_classes - 1} "
            "(phantom classes, or class_label in your datalist)"
        )
    return classes


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def resident_data(images: np.ndarray, device: torch.device, budget: float = 0.25) -> torch.Tensor:
    """The training set as one tensor: on the GPU when it takes under ``budget`` of the free memory
    (no host-to-device copy per step), else in host memory (each batch copied)."""
    data = torch.as_tensor(images, dtype=torch.float32)
    if device.type != "cuda":
        return data
    free, _ = torch.cuda.mem_get_info(device)
    return data.to(device) if data.nbytes < budget * free else data


def compiled(network: torch.nn.Module, enabled: bool, mode: str) -> torch.nn.Module:
    """``torch.compile`` the network when asked (``train.compile``); static shapes (fixed batch)."""
    return torch.compile(network, mode=mode, dynamic=False) if enabled else network


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class DiffusionTrainer(Trainer):
    """One step of diffusion training: noise the batch to random timesteps, predict (epsilon | v | velocity),
    regress to the target with Min-SNR weights; the EMA network is validated with fixed noise."""

    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(
        self,
        model_cfg: ModelConfig,
        diffusion: DiffusionConfig,
        train: TrainConfig,
        train_images: np.ndarray | PatchSet,
        val_images: np.ndarray,
        run: RunSettings,
        *,
        train_classes: np.ndarray | None = None,
        val_classes: np.ndarray | None = None,
        identity_extra: dict | None = None,
    ) -> None:
        self.diffusion, self.train, self.run = diffusion, train, run
        device = self.device = run.dist.device
        source = train_images if isinstance(train_images, PatchSet) else ImageSet(resident_data(train_images, device))
        self.source = source
        self.items_per_index = source.per_index
        spatial_dims = self.spatial_dims = source.spatial_dims
        self.amp_dtype = autocast_dtype(train.precision, device)
        self.num_classes = num_classes = model_cfg.num_classes
        if num_classes is not None:
            train_classes = check_classes(train_classes, len(train_images), num_classes, "training")
            val_classes = check_classes(val_classes, len(val_images), num_classes, "validation")
        self.view = {
            "model": result_view(model_cfg),
            "diffusion": result_view(diffusion),
            "train": result_view(train),
            "seed": run.seed,
            "dataset_size": len(source),
            "data_shape": source.describe(),
            **({"extra": identity_extra} if identity_extra else {}),
        }
        self.dataset_size = len(source)

        # the network, its EMA, optimiser and LR schedule (identical on every rank: same seed)
        torch.manual_seed(run.seed)
        channels = source.channels
        model = build_unet(model_cfg, spatial_dims=spatial_dims, in_channels=channels, out_channels=channels).to(device)
        if train.channels_last:
            model = model.to(memory_format=_memory_format(spatial_dims))
        self.model = model
        self.group = Optimised(
            "model",
            model,
            lr=train.lr,
            lr_key="train.lr",
            weight_decay=train.weight_decay,
            total=train.max_steps,
            warmup=train.warmup_steps,
            floor=train.min_lr_ratio,
            grad_clip=train.grad_clip,
            ema_decay=train.ema_decay,
            ema_warmup=train.ema_warmup,
        )
        self.groups = [self.group]
        if train.gradient_checkpointing:  # after the EMA copy: only the trained network recomputes
            enable_gradient_checkpointing(model)
        self.scheduler = build_train_scheduler(diffusion, spatial_dims=spatial_dims)
        self.inferer = DiffusionInferer(self.scheduler)
        self.model_kwargs = unet_kwargs(model_cfg, channels, channels)

        dist = run.dist
        net = DistributedDataParallel(model) if dist.distributed else model
        self.net = compiled(net, train.compile, train.compile_mode)
        self.val = torch.as_tensor(val_images[: train.val_images], dtype=torch.float32)
        self.classes = None if train_classes is None else torch.as_tensor(train_classes, dtype=torch.long).to(device)
        self.val_labels = (
            None
            if val_classes is None
            else torch.as_tensor(val_classes[: train.val_images], dtype=torch.long).to(device)
        )

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        train, diffusion, device = self.train, self.diffusion, self.device
        # every rank draws the whole global batch's items (crops are cheap) and keeps its own rows
        per = self.items_per_index
        rows = torch.arange(len(index) * per).view(len(index), per)[shard].reshape(-1)
        items = self.source.take(index, generator)
        x0 = items[rows.to(items.device)].to(device)
        if train.channels_last:
            x0 = x0.contiguous(memory_format=_memory_format(self.spatial_dims))
        batch = len(index) * per
        rows = rows.to(device)
        noise = torch.randn((batch, *x0.shape[1:]), generator=generator, device=device)[rows]
        t = sample_timesteps(
            self.scheduler, batch, generator=generator, device=device, high=diffusion.max_train_timestep
        )[rows]
        network = self.net
        if self.classes is not None:
            # label dropout: a share of the batch learns the unconditional model (the null class K)
            dropped = (torch.rand(batch, generator=generator, device=device) < train.label_dropout)[rows]
            mine = torch.as_tensor(index, device=device).repeat_interleave(per)[rows]
            labels = torch.where(
                dropped,
                torch.full_like(dropped, self.num_classes, dtype=torch.long),
                self.classes[mine],
            )
            network = partial(self.net, class_labels=labels)
        # 1. predict (epsilon | v | velocity) for the noised batch
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            prediction = self.inferer(inputs=x0, diffusion_model=network, noise=noise, timesteps=t)
        # 2. Min-SNR-weighted regression to the target
        target = prediction_target(self.scheduler, x0, noise, t, diffusion.prediction_type)
        weights = min_snr_weights(self.scheduler, t, diffusion.prediction_type, diffusion.min_snr_gamma)
        return {"loss": weighted_mse(prediction, target, weights)}

    def validation_names(self) -> tuple[str, ...]:
        return ("val/loss",)

    def validate(self, step: int) -> dict[str, float]:
        # Fixed noise and evenly spread timesteps, so the number is comparable across steps and runs.
        device, ema = self.device, self.group.ema
        generator = torch.Generator(device=device).manual_seed(self.run.seed + 7)
        x0 = self.val.to(device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        high = self.diffusion.max_train_timestep or self.scheduler.num_train_timesteps
        t = (torch.arange(len(x0), device=device) * high // len(x0)).long()
        network = ema.shadow if self.val_labels is None else partial(ema.shadow, class_labels=self.val_labels)
        with torch.no_grad(), torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            prediction = self.inferer(inputs=x0, diffusion_model=network, noise=noise, timesteps=t)
        target = prediction_target(self.scheduler, x0, noise, t, self.diffusion.prediction_type)
        return {"val/loss": float(weighted_mse(prediction, target, None))}


def train_diffusion(
    model: ModelConfig,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    train_images: np.ndarray | PatchSet,
    val_images: np.ndarray,
    run: RunSettings,
    *,
    preprocessing: dict[str, Any] | None = None,
    intensity: dict | None = None,
    train_classes: np.ndarray | None = None,
    val_classes: np.ndarray | None = None,
    extra_state: dict | None = None,
    identity_extra: dict | None = None,
) -> TrainResult:
    """Train a diffusion model on ``train_images`` (N, C, *spatial) in [-1, 1].

    Args:
        model: the network section (MONAI ``DiffusionModelUNet`` settings).
        diffusion: the forward process and objective.
        train: optimisation, EMA, cadence.
        train_images: training inputs, or a :class:`~medsynth.data.patches.PatchSet` of whole scans to crop
            (``train.batch_size`` then counts crops); ``val_images``: held-out inputs for the validation loss.
        run: seed, work folder (``checkpoints/last.pt`` and ``model.pt``, rank 0), process group, callbacks.
        preprocessing: how the training inputs were made from scans (spacing, slice axis, MR percentile,
            CT window), stored with the model: denoising treats a scan the same way.
        intensity: the intensity convention stored with the model, to map samples back to units.
        train_classes: class labels 0..K-1 of ``train_images`` (class-conditional models).
        val_classes: the same for ``val_images``.
        extra_state: more entries for the model file (e.g. the autoencoder of a latent model).
        identity_extra: more that a resumed checkpoint must match (e.g. the autoencoder's digest).

    Returns:
        The paths of the final checkpoint and model file, and the metric history.
    """
    if run.work_dir is None:
        raise ValueError("train_diffusion needs run.work_dir (where model.pt is written)")
    trainer = DiffusionTrainer(
        model,
        diffusion,
        train,
        train_images,
        val_images,
        run,
        train_classes=train_classes,
        val_classes=val_classes,
        identity_extra=identity_extra,
    )
    cadence = Cadence(
        max_steps=train.max_steps,
        batch_size=train.batch_size // trainer.items_per_index,  # scans per step when crops come several per scan
        log_every=train.log_every,
        val_every=train.val_every,
        checkpoint_every=train.checkpoint_every,
        resume=train.resume,
    )
    result = fit(trainer, cadence, run)

    # the model file: EMA weights plus how to rebuild and use them
    model_path = run.work_dir / "model.pt"
    if run.dist.is_main:
        save_state(
            model_path,
            {
                "format": MODEL_FORMAT,
                "format_version": FORMAT_VERSION,
                "step": train.max_steps,
                # the network's input size: the image size, or the latent size of a latent model
                "spatial_dims": trainer.spatial_dims,
                "image_size": list(trainer.source.item_shape),
                "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in trainer.model_kwargs.items()},
                "diffusion": to_plain(diffusion),
                "intensity": intensity or {},
                "data": preprocessing or {},
                "state_dict": trainer.group.ema.shadow.state_dict(),
                **(extra_state or {}),
            },
        )
    return TrainResult(
        steps=result.steps,
        model_path=model_path,
        checkpoint_path=run.checkpoint_path,
        history=result.history,
        resumed_from=result.resumed_from,
    )


def preprocessing_of(data: DataConfig, spacing_mm: list[float] | None) -> dict[str, Any]:
    """What the model file records of how its inputs were made from scans: the data section and the spacing."""
    return {
        "spacing_mm": spacing_mm,
        "slice_axis": data.slice_axis,
        "patches": to_plain(data.patches) if data.patches is not None else None,
        "mr_percentile": data.mr_percentile,
        "ct_window": list(data.ct_window),
    }
