"""Training the first stage of latent diffusion: MONAI ``AutoencoderKL`` with L1 + KL, an optional
perceptual loss, and a MONAI ``PatchDiscriminator`` least-squares adversarial loss after a warm-up
(the recipe of MONAI's generative tutorials; Rombach et al. 2022, Pinaya et al. 2022).

Run by the one training loop (:func:`medsynth.training.engine.fit`), which owns exact resume, cadence,
optimisation and progress; the crop offsets and the posterior-sample noise are pure functions of
``(seed, step)`` like the batches. Launch on several GPUs with ``torchrun --nproc_per_node=N -m medsynth run
<config>``; rank 0 alone logs and writes.
"""

from __future__ import annotations

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

from medsynth.config import AutoencoderConfig, result_view, to_plain
from medsynth.errors import MedsynthError
from medsynth.figures import sample_grid
from medsynth.io.state import FORMAT_VERSION, save_state
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
from medsynth.training.engine import Cadence, Optimised, RunSettings, Trainer, default_warmup, fit

AUTOENCODER_CHECKPOINT_FORMAT = "medsynth-autoencoder-checkpoint"
SCALE_FACTOR_IMAGES = 256  # training images whose posterior means set the latent scale factor


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


def discriminator_output_side(side: int, layers: int) -> int:
    """Side of ``PatchDiscriminator``'s output for an input side (kernel 4, padding 1; strides 2, then 1 for the
    last layer)."""
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


class AutoencoderTrainer(Trainer):
    """One step: reconstruct through a posterior sample; L1 + KL (+ perceptual) (+ adversarial generator
    term) for the autoencoder, least squares on (detached fakes, reals) for the discriminator."""

    checkpoint_format = AUTOENCODER_CHECKPOINT_FORMAT

    def __init__(
        self,
        cfg: AutoencoderConfig,
        train_images: np.ndarray,
        val_images: np.ndarray,
        run: RunSettings,
        *,
        spatial_dims: int,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.cfg, self.run, device = cfg, run, run.dist.device
        self.device = device
        self.size = _check_inputs(cfg, train_images, val_images, spatial_dims, run.dist)
        self.channels = int(train_images.shape[1])
        self.amp_dtype = autocast_dtype("auto", device)
        self.adversarial = cfg.adv_weight > 0  # no discriminator at all otherwise
        self.view = {
            "autoencoder": result_view(cfg, exclude=AutoencoderConfig.SAMPLING_KEYS),
            "seed": run.seed,
            "data_shape": list(train_images.shape),
        }
        self.dataset_size = len(train_images)

        # networks, optimisers, schedules (identical on every rank: same seed). No EMA: MONAI's recipe has
        # none, and an average of a generator trained against a discriminator is not what it was fitted for.
        torch.manual_seed(run.seed)
        warmup = default_warmup(cfg.warmup_steps, cfg.max_steps)
        self.autoencoder = build_autoencoder(cfg, spatial_dims, self.channels).to(device)
        self.groups = [
            Optimised(
                "autoencoder",
                self.autoencoder,
                lr=cfg.lr,
                lr_key="autoencoder.lr",
                total=cfg.max_steps,
                warmup=warmup,
                floor=cfg.min_lr_ratio,
                grad_clip=cfg.grad_clip,
                weight_decay=cfg.weight_decay,
            )
        ]
        self.discriminator = None
        if self.adversarial:
            self.discriminator = PatchDiscriminator(
                spatial_dims=spatial_dims,
                num_layers_d=cfg.disc_layers,
                channels=cfg.disc_channels,
                in_channels=self.channels,
                out_channels=1,
            ).to(device)
            # the discriminator's schedule runs from adv_start; its loss is weighted by adv_weight
            self.groups.append(
                Optimised(
                    "discriminator",
                    self.discriminator,
                    lr=cfg.disc_lr,
                    lr_key="autoencoder.disc_lr",
                    total=max(1, cfg.max_steps - cfg.adv_start),
                    warmup=warmup,
                    floor=cfg.min_lr_ratio,
                    grad_clip=cfg.grad_clip,
                    weight_decay=cfg.weight_decay,
                    loss="disc",
                    start=cfg.adv_start,
                    scale=cfg.adv_weight,
                )
            )
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.features = (
            PerceptualFeatures(spatial_dims, cfg.perceptual_depth, cfg.perceptual_weights).to(device)
            if cfg.perceptual_weight > 0
            else None
        )
        generator_net: nn.Module = _Reconstruction(self.autoencoder)
        disc_net = _DiscriminatorPair(self.discriminator) if self.adversarial else None
        if run.dist.distributed:
            generator_net = DistributedDataParallel(generator_net)
            disc_net = DistributedDataParallel(disc_net) if disc_net is not None else None
        self.generator_net, self.disc_net = generator_net, disc_net
        self.data = torch.as_tensor(train_images, dtype=torch.float32)
        self.val = torch.as_tensor(val_images[: cfg.val_images], dtype=torch.float32)
        self.latent_side = [s // cfg.downsample for s in self.size]

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg, device, amp = self.cfg, self.device, self.amp_dtype
        # the whole global batch (indices, crops, noise) is drawn on every rank, which keeps its share
        x = self.data[index]
        if cfg.patch_size is not None:
            offsets = crop_offsets(self.run.seed, step, len(index), tuple(self.data.shape[2:]), self.size)
            x = random_crops(x, offsets, self.size)
        x = x[shard].to(device)
        noise = torch.randn((len(index), cfg.latent_channels, *self.latent_side), generator=generator, device=device)[
            shard
        ]
        adversarial_now = self.adversarial and step >= cfg.adv_start
        losses: dict[str, torch.Tensor] = {}

        # 1. reconstruct through a posterior sample; L1 + KL (+ perceptual) (+ adversarial generator term)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            reconstruction, z_mu, z_sigma = self.generator_net(x, noise)
        reconstruction = reconstruction.float()
        losses["l1"] = F.l1_loss(reconstruction, x)
        losses["kl"] = kl_divergence(z_mu.float(), z_sigma.float())
        loss = losses["l1"] + cfg.kl_weight * losses["kl"]
        if self.features is not None:
            losses["perceptual"] = perceptual_loss(self.features, reconstruction, x)
            loss = loss + cfg.perceptual_weight * losses["perceptual"]
        if adversarial_now:
            self.discriminator.requires_grad_(False)  # the generator's loss does not train the discriminator
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits_fake = self.discriminator(reconstruction.contiguous())[-1]
            losses["gen_adv"] = self.adv_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
            loss = loss + cfg.adv_weight * losses["gen_adv"]
            # 2. the discriminator's loss: least squares on (detached fakes, reals)
            self.discriminator.requires_grad_(True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits_fake, logits_real = self.disc_net(reconstruction.detach().contiguous(), x.contiguous())
            losses["disc"] = 0.5 * (
                self.adv_loss(logits_fake.float(), target_is_real=False, for_discriminator=True)
                + self.adv_loss(logits_real.float(), target_is_real=True, for_discriminator=True)
            )
        return {"loss": loss, **losses}

    def validation_names(self) -> tuple[str, ...]:
        return ("val/psnr", "val/ssim", "val/l1")

    def validate(self, step: int) -> dict[str, float]:
        reconstruction = reconstruct(self.autoencoder, self.val, batch_size=self.cfg.batch_size, device=self.device)
        return reconstruction_metrics(reconstruction, self.val, self.spatial_dims)


def train_autoencoder(
    cfg: AutoencoderConfig,
    train_images: np.ndarray,
    val_images: np.ndarray,
    run: RunSettings,
    *,
    spatial_dims: int,
    intensity: dict | None = None,
) -> AutoencoderResult:
    """Train an ``AutoencoderKL`` on ``train_images`` (N, C, *spatial) in [-1, 1].

    Args:
        cfg: the autoencoder section.
        train_images: training images; with ``cfg.patch_size`` each step trains on random crops.
        val_images: held-out images; the first ``cfg.val_images`` are reconstructed whole.
        run: seed, work folder (``checkpoints/last.pt``, ``autoencoder.pt``, ``reconstructions.png``; rank 0),
            process group, callbacks.
        spatial_dims: 2 or 3 (``data.spatial_dims``): the images must have that many spatial axes.
        intensity: the intensity convention stored with the model.

    Returns:
        Paths of the model file, checkpoint and figure; the metric history; the latent scale factor.

    Raises:
        MedsynthError: bad input shapes, a checkpoint of another run on resume, or a diverged loss.
    """
    if run.work_dir is None:
        raise ValueError("train_autoencoder needs run.work_dir (where autoencoder.pt is written)")
    trainer = AutoencoderTrainer(cfg, train_images, val_images, run, spatial_dims=spatial_dims)
    cadence = Cadence(
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        log_every=cfg.log_every,
        val_every=cfg.val_every,
        checkpoint_every=cfg.checkpoint_every,
        resume=cfg.resume,
    )
    result = fit(trainer, cadence, run)
    history, autoencoder, work_dir = result.history, trainer.autoencoder, run.work_dir

    # the latent scale factor, from the posterior means of whole training images
    autoencoder.eval().requires_grad_(False)
    means = posterior_means(
        autoencoder, trainer.data[:SCALE_FACTOR_IMAGES], batch_size=cfg.batch_size, device=trainer.device
    )
    scale_factor = compute_scale_factor(means)

    # the model file and the reconstruction figure (rank 0)
    model_path, figure_path, val_metrics = work_dir / "autoencoder.pt", None, {}
    if run.dist.is_main:
        val = trainer.val
        reconstruction = reconstruct(autoencoder, val, batch_size=cfg.batch_size, device=trainer.device)
        val_metrics = reconstruction_metrics(reconstruction, val, trainer.spatial_dims)
        trained = TrainedAutoencoder(
            network=autoencoder,
            spatial_dims=trainer.spatial_dims,
            scale_factor=scale_factor,
            downsample=cfg.downsample,
            latent_channels=cfg.latent_channels,
            image_size=list(train_images.shape[2:]),
            intensity=intensity or {},
            step=cfg.max_steps,
            path=model_path,
            kwargs=autoencoder_kwargs(cfg, trainer.channels),
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
                    "seed": run.seed,
                    "patch_size": trainer.size,
                    "final": {k: v for k, v in final_train.items() if k.startswith("train/")},
                    "val": val_metrics,
                },
            },
        )
        figure_path = sample_grid(
            reconstruction.numpy(),
            work_dir / "reconstructions.png",
            real=val.numpy(),
            title=f"autoencoder: held-out images (left) and reconstructions (right), "
            f"PSNR {val_metrics['val/psnr']:.1f} dB",
        )
    return AutoencoderResult(
        steps=cfg.max_steps,
        model_path=model_path,
        checkpoint_path=run.checkpoint_path,
        history=history,
        resumed_from=result.resumed_from,
        scale_factor=scale_factor,
        val_metrics=val_metrics,
        reconstructions_path=figure_path,
    )
