"""The diffusion training loop: MONAI ``DiffusionModelUNet`` + scheduler through ``DiffusionInferer``.

Exact resume: the data order and the per-step noise are pure functions of ``(seed, step)``, and
a checkpoint holds every other piece of state (model, EMA, optimiser, LR scheduler, grad scaler,
global RNG states, step). An interrupted run resumed with ``train.resume=true`` ends with the same
weights as one that was never interrupted (on CPU; GPU kernels are not bitwise deterministic).

No MLflow here: metrics leave through the ``log_metrics`` callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from medsynth.config import Config, digest, to_plain
from medsynth.diffusion.objectives import min_snr_weights, prediction_target, sample_timesteps, weighted_mse
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.errors import MedsynthError
from medsynth.io.state import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    load_state,
    rng_states,
    save_state,
    set_rng_states,
)
from medsynth.models.ema import EMA
from medsynth.models.unet import build_unet, enable_gradient_checkpointing, unet_kwargs
from medsynth.runtime import DistContext, autocast_dtype

MetricsCallback = Callable[[dict[str, float], int], None] | None


@dataclass
class TrainResult:
    steps: int
    model_path: Path
    checkpoint_path: Path
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def batch_indices(step: int, batch: int, count: int, seed: int) -> np.ndarray:
    """Indices of global batch ``step``: a stream of per-epoch permutations seeded by ``(seed, epoch)``."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), count)
        order = np.random.default_rng([seed, epoch]).permutation(count)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one step's noise and timesteps: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to ``floor`` (as a fraction of the peak LR)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def training_identity(config: Config, extra: dict | None = None) -> str:
    """What must match for a checkpoint to be resumed: network, process, data size, seed (and ``extra``)."""
    train = to_plain(config.train)
    for key in ("resume", "checkpoint_every", "val_every", "log_every"):
        train.pop(key)
    return digest(
        {
            "model": to_plain(config.model),
            "diffusion": to_plain(config.diffusion),
            "train": train,
            "seed": config.seed,
            "image_size": config.data.image_size,
            "spatial_dims": config.data.spatial_dims,
            **({"extra": extra} if extra else {}),
        }
    )


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


def adamw(params, *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel for all parameters instead of a loop,
    measured about 4x faster per optimiser step on a 2-core CPU (docs/benchmarks.md)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


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


def train_diffusion(
    config: Config,
    train_images: np.ndarray,
    val_images: np.ndarray,
    work_dir: Path,
    ctx: DistContext,
    *,
    intensity: dict | None = None,
    spacing_mm: list[float] | None = None,
    log_metrics: MetricsCallback = None,
    step_callback: Callable[[int], None] | None = None,
    train_classes: np.ndarray | None = None,
    val_classes: np.ndarray | None = None,
    extra_state: dict | None = None,
    identity_extra: dict | None = None,
) -> TrainResult:
    """Train a diffusion model on ``train_images`` (N, C, *spatial) in [-1, 1].

    Args:
        config: the resolved config (model, diffusion, train, data sections are used).
        train_images: training inputs.
        val_images: held-out inputs for the validation loss.
        work_dir: where ``checkpoints/last.pt`` and ``model.pt`` are written (rank 0 only).
        ctx: the process group context (single process: rank 0 of 1).
        intensity: the intensity convention stored with the model, to map samples back to units.
        spacing_mm: the voxel spacing of the training inputs, stored with the model (denoising checks it).
        log_metrics: called with ``({name: value}, step)`` on rank 0.
        step_callback: called after every completed (and, when due, checkpointed) step.
        train_classes: class labels 0..K-1 of ``train_images`` (class-conditional models, ``model.num_classes``).
        val_classes: the same for ``val_images``.
        extra_state: more entries for the model file (e.g. the autoencoder of a latent model).
        identity_extra: more that a resumed checkpoint must match (e.g. the autoencoder's digest).

    Returns:
        The paths of the final checkpoint and model file, and the metric history.
    """
    tcfg, spatial_dims = config.train, config.data.spatial_dims
    device = ctx.device
    if tcfg.batch_size % ctx.world_size:
        raise MedsynthError(f"train.batch_size {tcfg.batch_size} is not divisible by the {ctx.world_size} processes")
    amp_dtype = autocast_dtype(tcfg.precision, device)
    num_classes = config.model.num_classes
    if num_classes is not None:
        train_classes = check_classes(train_classes, len(train_images), num_classes, "training")
        val_classes = check_classes(val_classes, len(val_images), num_classes, "validation")
    checkpoint_path = work_dir / "checkpoints" / "last.pt"

    # 1. network, EMA, optimiser, schedules (identical on every rank: same seed)
    torch.manual_seed(config.seed)
    model = build_unet(
        config.model, spatial_dims=spatial_dims, in_channels=train_images.shape[1], out_channels=train_images.shape[1]
    ).to(device)
    channels_last = tcfg.channels_last
    if channels_last:
        model = model.to(memory_format=_memory_format(spatial_dims))
    ema = EMA(model, decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)
    if tcfg.gradient_checkpointing:  # after the EMA copy: only the trained network recomputes
        enable_gradient_checkpointing(model)
    optimizer = adamw(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=tcfg.warmup_steps, total=tcfg.max_steps, floor=tcfg.min_lr_ratio)
    )
    # Loss scaling only matters for fp16; medsynth autocasts to bf16, so the scaler stays disabled but
    # its state is checkpointed like the rest.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    scheduler = build_train_scheduler(config.diffusion, spatial_dims=spatial_dims)
    inferer = DiffusionInferer(scheduler)
    identity = training_identity(config, identity_extra)

    # 2. resume
    start, history, resumed_from = 0, [], None
    if tcfg.resume and checkpoint_path.is_file():
        state = load_state(checkpoint_path, expected_format=CHECKPOINT_FORMAT)
        if state["identity"] != identity:
            raise MedsynthError(
                f"{checkpoint_path}: was trained with a different model/diffusion/train config; cannot resume"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["grad_scaler"])
        set_rng_states(state["rng"])
        start, history, resumed_from = int(state["step"]), list(state["history"]), int(state["step"])

    net = compiled(DistributedDataParallel(model) if ctx.distributed else model, tcfg.compile, tcfg.compile_mode)
    data = resident_data(train_images, device)
    val = torch.as_tensor(val_images[: tcfg.val_images], dtype=torch.float32)
    classes = None if train_classes is None else torch.as_tensor(train_classes, dtype=torch.long).to(data.device)
    val_labels = (
        None if val_classes is None else torch.as_tensor(val_classes[: tcfg.val_images], dtype=torch.long).to(device)
    )

    def checkpoint(step: int) -> None:
        if not ctx.is_main:
            return
        save_state(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "step": step,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "rng": rng_states(),
                "data_order": {"seed": config.seed, "next_position": step * tcfg.batch_size, "dataset_size": len(data)},
                "history": history,
            },
        )

    def validation_loss() -> float:
        # Fixed noise and evenly spread timesteps, so the number is comparable across steps and runs.
        generator = torch.Generator(device=device).manual_seed(config.seed + 7)
        x0 = val.to(device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = (
            torch.arange(len(x0), device=device)
            * (config.diffusion.max_train_timestep or scheduler.num_train_timesteps)
            // len(x0)
        ).long()
        network = ema.shadow if val_labels is None else partial(ema.shadow, class_labels=val_labels)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            prediction = inferer(inputs=x0, diffusion_model=network, noise=noise, timesteps=t)
        target = prediction_target(scheduler, x0, noise, t, config.diffusion.prediction_type)
        return float(weighted_mse(prediction, target, None))

    # 3. loop
    window_loss, window_images, window_start = [], 0, time.perf_counter()
    bar = tqdm(
        total=tcfg.max_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=None if ctx.is_main else True,
        dynamic_ncols=True,
    )
    completed, updating = start, False
    try:
        for step in range(start, tcfg.max_steps):
            model.train()
            # Every rank draws the whole global batch's indices, noise and timesteps and keeps its
            # share, so N processes train exactly what one process would (up to summation order).
            shard = slice(ctx.rank, None, ctx.world_size)
            index = torch.as_tensor(
                batch_indices(step, tcfg.batch_size, len(data), config.seed)[shard], device=data.device
            )
            x0 = data[index].to(device)
            if channels_last:
                x0 = x0.contiguous(memory_format=_memory_format(spatial_dims))
            generator = step_generator(config.seed, step, device)
            noise = torch.randn((tcfg.batch_size, *x0.shape[1:]), generator=generator, device=device)[shard]
            t = sample_timesteps(
                scheduler, tcfg.batch_size, generator=generator, device=device, high=config.diffusion.max_train_timestep
            )[shard]
            network = net
            if classes is not None:
                # label dropout: a share of the batch learns the unconditional model (the null class K)
                dropped = (torch.rand(tcfg.batch_size, generator=generator, device=device) < tcfg.label_dropout)[shard]
                labels = torch.where(
                    dropped, torch.full_like(dropped, num_classes, dtype=torch.long), classes[index].to(device)
                )
                network = partial(net, class_labels=labels)

            # 1. predict (epsilon | v | velocity) for the noised batch
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                prediction = inferer(inputs=x0, diffusion_model=network, noise=noise, timesteps=t)
            # 2. Min-SNR-weighted regression to the target
            target = prediction_target(scheduler, x0, noise, t, config.diffusion.prediction_type)
            loss = weighted_mse(
                prediction,
                target,
                min_snr_weights(scheduler, t, config.diffusion.prediction_type, config.diffusion.min_snr_gamma),
            )
            # On CPU the check costs nothing; on a GPU reading the loss each step would stall the
            # queue of kernels, so the window's loss sum is checked before it is logged or checkpointed.
            if device.type == "cpu" and not torch.isfinite(loss):
                raise MedsynthError(f"training diverged at step {step} (loss {loss.item()}); lower train.lr")
            # 3. update weights, LR, EMA
            updating = True
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            ema.update(model)
            completed, updating = step + 1, False

            done = completed
            window_loss.append(loss.detach())
            window_images += len(x0) * ctx.world_size
            logging_due = done % tcfg.log_every == 0 or done == tcfg.max_steps
            if logging_due or done % tcfg.checkpoint_every == 0:
                window_mean = float(torch.stack(window_loss).mean())
                if not math.isfinite(window_mean):
                    raise MedsynthError(f"training diverged before step {done} (loss {window_mean}); lower train.lr")
            if logging_due:
                elapsed = time.perf_counter() - window_start
                record = {
                    "train/loss": window_mean,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/images_per_s": window_images / max(elapsed, 1e-9),
                }
                if done % tcfg.val_every == 0 or done == tcfg.max_steps:
                    record["val/loss"] = validation_loss() if ctx.is_main else float("nan")
                history.append({"step": done, **record})
                if ctx.is_main and log_metrics is not None:
                    log_metrics(record, done)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}")
                window_loss, window_images, window_start = [], 0, time.perf_counter()
            if done % tcfg.checkpoint_every == 0 or done == tcfg.max_steps:
                checkpoint(done)
            bar.update(1)
            if step_callback is not None:
                step_callback(done)
    except KeyboardInterrupt:
        # Keep the work: when the interrupt fell between steps, checkpoint the last completed one so
        # that resume=true continues there; mid-update the state is torn, so the periodic one stands.
        if not updating and completed > start:
            checkpoint(completed)
        raise
    finally:
        bar.close()

    # 4. the model file: EMA weights plus how to rebuild and use them
    model_path = work_dir / "model.pt"
    if ctx.is_main:
        save_state(
            model_path,
            {
                "format": MODEL_FORMAT,
                "format_version": FORMAT_VERSION,
                "step": tcfg.max_steps,
                # the network's input size: the image size, or the latent size of a latent model
                "spatial_dims": spatial_dims,
                "image_size": list(train_images.shape[2:]),
                "unet": {
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in unet_kwargs(config.model, train_images.shape[1], train_images.shape[1]).items()
                },
                "diffusion": to_plain(config.diffusion),
                "intensity": intensity or {},
                # How the training inputs were made from scans: what denoising needs to treat a scan the same way.
                "data": {
                    "spacing_mm": spacing_mm,
                    "slice_axis": config.data.slice_axis,
                    "mr_percentile": config.data.mr_percentile,
                    "ct_window": list(config.data.ct_window),
                },
                "state_dict": ema.shadow.state_dict(),
                **(extra_state or {}),
            },
        )
    return TrainResult(
        steps=tcfg.max_steps,
        model_path=model_path,
        checkpoint_path=checkpoint_path,
        history=history,
        resumed_from=resumed_from,
    )
