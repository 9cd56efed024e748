"""Training the first stage of latent diffusion: MONAI ``AutoencoderKL`` with L1 + KL, an optional
perceptual loss, and a MONAI ``PatchDiscriminator`` least-squares adversarial loss after a warm-up
(the recipe of MONAI's generative tutorials; Rombach et al. 2022, Pinaya et al. 2022).

Exact resume, as the diffusion trainer: the data order, the crop offsets and the posterior-sample noise
are pure functions of ``(seed, step)``, and the checkpoint holds every other piece of state (both
networks, both optimisers and LR schedules, the global RNG states, the step). An interrupted run resumed
with ``autoencoder.resume=true`` ends with the same weights as one never interrupted (on CPU).

Launch on several GPUs with ``torchrun --nproc_per_node=N -m medsynth run <config>``; rank 0 alone logs
and writes. No MLflow here: metrics leave through the ``log_metrics`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from medsynth.config import AutoencoderConfig, Config, digest, to_plain
from medsynth.errors import MedsynthError
from medsynth.figures import sample_grid
from medsynth.io.state import FORMAT_VERSION, load_state, rng_states, save_state, set_rng_states
from medsynth.metrics.restoration import SSIM_K1, SSIM_K2, SSIM_KERNEL_SIGMA, ssim_kernel
from medsynth.models.autoencoder import (
    AUTOENCODER_FORMAT,
    PerceptualFeatures,
    TrainedAutoencoder,
    autoencoder_kwargs,
    autoencoder_state,
    build_autoencoder,
    compute_scale_factor,
    perceptual_loss,
    posterior_means,
)
from medsynth.runtime import DistContext, autocast_dtype
from medsynth.training.trainer import batch_indices, lr_factor, step_generator

AUTOENCODER_CHECKPOINT_FORMAT = "medsynth-autoencoder-checkpoint"
# The learning-rate shape is local to this stage (not train.warmup_steps / train.min_lr_ratio, which
# belong to the diffusion model): a short linear warm-up, then cosine decay to 10 % of the peak.
MAX_WARMUP_STEPS = 50
MIN_LR_RATIO = 0.1
SCALE_FACTOR_IMAGES = 256  # training images whose posterior means set the latent scale factor
# Keys that change neither the trained weights nor the data order: a resume may change them.
NON_IDENTITY_KEYS = (
    "resume",
    "log_every",
    "val_every",
    "val_images",
    "checkpoint_every",
    "decode_roi",
    "decode_overlap",
)

MetricsCallback = Callable[[dict[str, float], int], None] | None


@dataclass
class AutoencoderResult:
    """What :func:`train_autoencoder` made.

    ``val_metrics`` (``val/psnr``, ``val/ssim``, ``val/l1``) are those of the final weights, and
    ``reconstructions_path`` is the figure of held-out images beside their reconstructions (rank 0).
    """

    steps: int
    model_path: Path
    checkpoint_path: Path
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    scale_factor: float = float("nan")
    val_metrics: dict[str, float] = field(default_factory=dict)
    reconstructions_path: Path | None = None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class _Reconstruction(nn.Module):
    """The generator pass as one module: encode, sample the posterior with the given noise, decode.

    DDP synchronises gradients only through ``forward``; and the noise is passed in (a pure function of
    ``(seed, step)``) instead of MONAI's ``AutoencoderKL.sampling``, which draws from the global RNG.
    """

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.autoencoder.encode(x)
        return self.autoencoder.decode(z_mu + noise * z_sigma), z_mu, z_sigma


class _DiscriminatorPair(nn.Module):
    """Discriminator logits of fakes and reals in one ``forward`` (DDP allows one forward per backward);
    the two sets go through separately, so batch norm sees each on its own, as in MONAI's tutorials."""

    def __init__(self, discriminator: PatchDiscriminator) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(fake)[-1], self.discriminator(real)[-1]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent channels and voxels, averaged over the batch
    (Kingma & Welling 2014, appendix B; as in MONAI's latent diffusion tutorials)."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.flatten(1).sum(dim=1).mean()


def crop_offsets(seed: int, step: int, count: int, image_size: tuple[int, ...], patch_size: list[int]) -> np.ndarray:
    """Corner of each of the global batch's ``count`` random crops: a pure function of ``(seed, step)``."""
    rng = np.random.default_rng([seed, step, 0xC0])
    return np.stack([rng.integers(0, s - p + 1, size=count) for s, p in zip(image_size, patch_size)], axis=1)


def random_crops(images: torch.Tensor, offsets: np.ndarray, patch_size: list[int]) -> torch.Tensor:
    """Crop ``images[i]`` (C, *spatial) at ``offsets[i]`` to ``patch_size``."""
    return torch.stack(
        [
            image[(slice(None), *(slice(o, o + p) for o, p in zip(offset, patch_size)))]
            for image, offset in zip(images, offsets)
        ]
    )


def autoencoder_identity(config: Config, data_shape: tuple[int, ...]) -> str:
    """What must match for a checkpoint to be resumed: the autoencoder section (less cadence keys), seed, data shape."""
    section = to_plain(config.autoencoder)
    for key in NON_IDENTITY_KEYS:
        section.pop(key)
    return digest(
        {
            "autoencoder": section,
            "seed": config.seed,
            "spatial_dims": config.data.spatial_dims,
            "data_shape": list(data_shape),
        }
    )


def discriminator_output_side(side: int, layers: int) -> int:
    """Side of ``PatchDiscriminator``'s output for an input side (kernel 4, padding 1; strides 2, then 1 for the last layer)."""
    side = (side - 2) // 2 + 1  # initial_conv, stride 2
    for layer in range(layers):
        side = (side - 2) // (1 if layer == layers - 1 else 2) + 1
    return side - 1  # final_conv, kernel 4, stride 1


def _check_inputs(
    cfg: AutoencoderConfig, train_images: np.ndarray, val_images: np.ndarray, spatial_dims: int, ctx: DistContext
) -> list[int]:
    """The training-input side (crop or whole image), after checking the data fits the networks."""
    if train_images.ndim != spatial_dims + 2 or len(train_images) == 0 or len(val_images) == 0:
        raise MedsynthError(
            f"autoencoder training needs non-empty (N, C, *spatial) arrays with {spatial_dims} spatial dims; "
            f"got train {train_images.shape}, val {val_images.shape}"
        )
    if cfg.batch_size % ctx.world_size:
        raise MedsynthError(
            f"autoencoder.batch_size {cfg.batch_size} is not divisible by the {ctx.world_size} processes"
        )
    image_size = list(train_images.shape[2:])
    if any(s % cfg.downsample for s in image_size):
        raise MedsynthError(
            f"image size {image_size} is not divisible by the autoencoder's downsampling {cfg.downsample} "
            "(2^(len(autoencoder.channels) - 1))"
        )
    size = list(cfg.patch_size) if cfg.patch_size is not None else image_size
    if len(size) != spatial_dims or any(p > s for p, s in zip(size, image_size)):
        raise MedsynthError(f"autoencoder.patch_size {size} does not fit the images {image_size}")
    if cfg.adv_weight > 0 and discriminator_output_side(min(size), cfg.disc_layers) < 1:
        raise MedsynthError(
            f"autoencoder.disc_layers {cfg.disc_layers} is too deep for training inputs of side {min(size)}; "
            "lower it or train on larger patches"
        )
    return size


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(
    autoencoder: AutoencoderKL, images: torch.Tensor, *, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Whole-image reconstructions through the posterior mean (MONAI's ``AutoencoderKL.reconstruct``), on the CPU."""
    was_training = autoencoder.training
    autoencoder.eval()
    out = [
        autoencoder.reconstruct(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    autoencoder.train(was_training)
    return torch.cat(out)


def reconstruction_metrics(reconstruction: torch.Tensor, images: torch.Tensor, spatial_dims: int) -> dict[str, float]:
    """``val/psnr``, ``val/ssim`` (MONAI, on images mapped from [-1, 1] to [0, 1], data range 1; the SSIM
    window of :mod:`medsynth.metrics.restoration`) and ``val/l1`` (in [-1, 1] units)."""
    fake, real = ((reconstruction + 1) / 2).clamp(0, 1), ((images + 1) / 2).clamp(0, 1)
    ssim = SSIMMetric(
        spatial_dims=spatial_dims,
        data_range=1.0,
        kernel_type="gaussian",
        win_size=ssim_kernel(tuple(images.shape[2:])),
        kernel_sigma=SSIM_KERNEL_SIGMA,
        k1=SSIM_K1,
        k2=SSIM_K2,
    )
    return {
        "val/psnr": float(PSNRMetric(max_val=1.0)(fake, real).mean()),
        "val/ssim": float(ssim(fake, real).mean()),
        "val/l1": float((reconstruction - images).abs().mean()),
    }


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def train_autoencoder(
    config: Config,
    train_images: np.ndarray,
    val_images: np.ndarray,
    work_dir: Path,
    ctx: DistContext,
    *,
    intensity: dict | None = None,
    log_metrics: MetricsCallback = None,
    step_callback: Callable[[int], None] | None = None,
) -> AutoencoderResult:
    """Train an ``AutoencoderKL`` on ``train_images`` (N, C, *spatial) in [-1, 1].

    Args:
        config: the resolved config (``autoencoder``, ``data.spatial_dims`` and ``seed`` are used).
        train_images: training images; with ``autoencoder.patch_size`` each step trains on random crops.
        val_images: held-out images; the first ``autoencoder.val_images`` are reconstructed whole.
        work_dir: where ``checkpoints/last.pt``, ``autoencoder.pt`` and ``reconstructions.png`` are written (rank 0).
        ctx: the process group context (single process: rank 0 of 1).
        intensity: the intensity convention stored with the model.
        log_metrics: called with ``({name: value}, step)`` on rank 0.
        step_callback: called after every completed (and, when due, checkpointed) step.

    Returns:
        Paths of the model file, checkpoint and figure; the metric history; the latent scale factor.

    Raises:
        MedsynthError: bad input shapes, a checkpoint of another run on resume, or a diverged loss.
    """
    cfg, spatial_dims, device = config.autoencoder, config.data.spatial_dims, ctx.device
    size = _check_inputs(cfg, train_images, val_images, spatial_dims, ctx)
    channels = int(train_images.shape[1])
    amp_dtype = autocast_dtype("auto", device)
    checkpoint_path = work_dir / "checkpoints" / "last.pt"
    identity = autoencoder_identity(config, tuple(train_images.shape))
    adversarial = cfg.adv_weight > 0  # no discriminator at all otherwise

    # 1. networks, optimisers, schedules (identical on every rank: same seed). No EMA: MONAI's recipe
    # has none, and an average of a generator trained against a discriminator is not what it was fitted for.
    torch.manual_seed(config.seed)
    autoencoder = build_autoencoder(cfg, spatial_dims, channels).to(device)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=cfg.lr)
    warmup = min(MAX_WARMUP_STEPS, cfg.max_steps // 10)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=cfg.max_steps, floor=MIN_LR_RATIO)
    )
    discriminator = disc_optimizer = disc_scheduler = None
    if adversarial:
        discriminator = PatchDiscriminator(
            spatial_dims=spatial_dims,
            num_layers_d=cfg.disc_layers,
            channels=cfg.disc_channels,
            in_channels=channels,
            out_channels=1,
        ).to(device)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_lr)
        disc_total = max(1, cfg.max_steps - cfg.adv_start)  # the discriminator's schedule runs from adv_start
        disc_scheduler = torch.optim.lr_scheduler.LambdaLR(
            disc_optimizer, lambda s: lr_factor(s, warmup=warmup, total=disc_total, floor=MIN_LR_RATIO)
        )
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    features = (
        PerceptualFeatures(spatial_dims, cfg.perceptual_depth, cfg.perceptual_weights).to(device)
        if cfg.perceptual_weight > 0
        else None
    )

    # 2. resume
    start, history, resumed_from = 0, [], None
    if cfg.resume and checkpoint_path.is_file():
        state = load_state(checkpoint_path, expected_format=AUTOENCODER_CHECKPOINT_FORMAT)
        if state["identity"] != identity:
            raise MedsynthError(
                f"{checkpoint_path}: was trained with a different autoencoder config, seed or data; cannot resume"
            )
        autoencoder.load_state_dict(state["autoencoder"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if adversarial:
            discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
            disc_scheduler.load_state_dict(state["disc_lr_scheduler"])
        set_rng_states(state["rng"])
        start, history, resumed_from = int(state["step"]), list(state["history"]), int(state["step"])

    generator_net = _Reconstruction(autoencoder)
    disc_net = _DiscriminatorPair(discriminator) if adversarial else None
    if ctx.distributed:
        generator_net = DistributedDataParallel(generator_net)
        disc_net = DistributedDataParallel(disc_net) if adversarial else None
    data = torch.as_tensor(train_images, dtype=torch.float32)
    val = torch.as_tensor(val_images[: cfg.val_images], dtype=torch.float32)
    latent_side = [s // cfg.downsample for s in size]

    def checkpoint(step: int) -> None:
        if not ctx.is_main:
            return
        save_state(
            checkpoint_path,
            {
                "format": AUTOENCODER_CHECKPOINT_FORMAT,
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "step": step,
                "autoencoder": autoencoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                **(
                    {
                        "discriminator": discriminator.state_dict(),
                        "disc_optimizer": disc_optimizer.state_dict(),
                        "disc_lr_scheduler": disc_scheduler.state_dict(),
                    }
                    if adversarial
                    else {}
                ),
                "rng": rng_states(),
                "history": history,
            },
        )

    # 3. loop
    window: dict[str, list[float]] = {}
    window_images, window_start = 0, time.perf_counter()
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc="autoencoder",
        unit="step",
        disable=None if ctx.is_main else True,
        dynamic_ncols=True,
    )
    completed, updating = start, False
    try:
        for step in range(start, cfg.max_steps):
            autoencoder.train()
            # Every rank draws the whole global batch (indices, crops, noise) and keeps its share, so N
            # processes train what one process would (up to summation order and batch-norm statistics).
            shard = slice(ctx.rank, None, ctx.world_size)
            index = batch_indices(step, cfg.batch_size, len(data), config.seed)
            x = data[index]
            if cfg.patch_size is not None:
                x = random_crops(x, crop_offsets(config.seed, step, len(index), tuple(data.shape[2:]), size), size)
            x = x[shard].to(device)
            generator = step_generator(config.seed, step, device)
            noise = torch.randn(
                (cfg.batch_size, cfg.latent_channels, *latent_side), generator=generator, device=device
            )[shard]
            adversarial_now = adversarial and step >= cfg.adv_start
            losses: dict[str, torch.Tensor] = {}

            # 1. reconstruct through a posterior sample; L1 + KL (+ perceptual) (+ adversarial generator term)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                reconstruction, z_mu, z_sigma = generator_net(x, noise)
            reconstruction = reconstruction.float()
            losses["l1"] = F.l1_loss(reconstruction, x)
            losses["kl"] = kl_divergence(z_mu.float(), z_sigma.float())
            loss = losses["l1"] + cfg.kl_weight * losses["kl"]
            if features is not None:
                losses["perceptual"] = perceptual_loss(features, reconstruction, x)
                loss = loss + cfg.perceptual_weight * losses["perceptual"]
            if adversarial_now:
                discriminator.requires_grad_(False)  # the generator's step does not train the discriminator
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits_fake = discriminator(reconstruction.contiguous())[-1]
                losses["gen_adv"] = adv_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
                loss = loss + cfg.adv_weight * losses["gen_adv"]
            if not torch.isfinite(loss):
                raise MedsynthError(
                    f"autoencoder training diverged at step {step} (loss {loss.item()}); lower autoencoder.lr"
                )

            # 2. update the autoencoder and its LR
            updating = True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), cfg.grad_clip)
            optimizer.step()
            lr_scheduler.step()

            # 3. update the discriminator: least squares on (detached fakes, reals), weighted by adv_weight
            if adversarial_now:
                discriminator.requires_grad_(True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits_fake, logits_real = disc_net(reconstruction.detach().contiguous(), x.contiguous())
                losses["disc"] = 0.5 * (
                    adv_loss(logits_fake.float(), target_is_real=False, for_discriminator=True)
                    + adv_loss(logits_real.float(), target_is_real=True, for_discriminator=True)
                )
                if not torch.isfinite(losses["disc"]):
                    raise MedsynthError(
                        f"autoencoder training diverged at step {step} (discriminator loss {losses['disc'].item()}); "
                        "lower autoencoder.disc_lr"
                    )
                disc_optimizer.zero_grad(set_to_none=True)
                (cfg.adv_weight * losses["disc"]).backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(discriminator.parameters(), cfg.grad_clip)
                disc_optimizer.step()
                disc_scheduler.step()
            completed, updating = step + 1, False

            done = completed
            for name, value in {"loss": loss, **losses}.items():
                window.setdefault(name, []).append(value.item())
            window_images += len(x) * ctx.world_size
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {f"train/{name}": float(np.mean(values)) for name, values in window.items()}
                record["train/lr"] = optimizer.param_groups[0]["lr"]
                record["train/images_per_s"] = window_images / max(elapsed, 1e-9)
                if done % cfg.val_every == 0 or done == cfg.max_steps:
                    record.update(
                        reconstruction_metrics(
                            reconstruct(autoencoder, val, batch_size=cfg.batch_size, device=device), val, spatial_dims
                        )
                        if ctx.is_main
                        else dict.fromkeys(("val/psnr", "val/ssim", "val/l1"), float("nan"))
                    )
                history.append({"step": done, **record})
                if ctx.is_main and log_metrics is not None:
                    log_metrics(record, done)
                bar.set_postfix(l1=f"{record['train/l1']:.4f}")
                window, window_images, window_start = {}, 0, time.perf_counter()
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
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

    # 4. the latent scale factor, from the posterior means of whole training images
    autoencoder.eval().requires_grad_(False)
    means = posterior_means(autoencoder, data[:SCALE_FACTOR_IMAGES], batch_size=cfg.batch_size, device=device)
    scale_factor = compute_scale_factor(means)

    # 5. the model file and the reconstruction figure (rank 0)
    model_path, figure_path, val_metrics = work_dir / "autoencoder.pt", None, {}
    if ctx.is_main:
        reconstruction = reconstruct(autoencoder, val, batch_size=cfg.batch_size, device=device)
        val_metrics = reconstruction_metrics(reconstruction, val, spatial_dims)
        trained = TrainedAutoencoder(
            network=autoencoder,
            spatial_dims=spatial_dims,
            scale_factor=scale_factor,
            downsample=cfg.downsample,
            latent_channels=cfg.latent_channels,
            image_size=list(train_images.shape[2:]),
            intensity=intensity or {},
            step=cfg.max_steps,
            path=model_path,
            kwargs=autoencoder_kwargs(cfg, channels),
        )
        final_train = next((h for h in reversed(history) if "train/l1" in h), {})
        save_state(
            model_path,
            {
                "format": AUTOENCODER_FORMAT,
                "format_version": FORMAT_VERSION,
                **autoencoder_state(trained),
                "training": {
                    "config": to_plain(cfg),
                    "seed": config.seed,
                    "patch_size": size,
                    "final": {k: v for k, v in final_train.items() if k.startswith("train/")},
                    "val": val_metrics,
                },
            },
        )
        figure_path = sample_grid(
            reconstruction.numpy(),
            work_dir / "reconstructions.png",
            real=val.numpy(),
            title=f"autoencoder: held-out images (left) and reconstructions (right), PSNR {val_metrics['val/psnr']:.1f} dB",
        )
    return AutoencoderResult(
        steps=cfg.max_steps,
        model_path=model_path,
        checkpoint_path=checkpoint_path,
        history=history,
        resumed_from=resumed_from,
        scale_factor=scale_factor,
        val_metrics=val_metrics,
        reconstructions_path=figure_path,
    )
