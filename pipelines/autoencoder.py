"""autoencoder: cached model inputs -> MONAI AutoencoderKL, the first stage of latent diffusion.

Runs under ``torchrun`` like ``train`` (rank 0 alone logs and writes). Outputs
(``output_dir/autoencoder/``): ``autoencoder.pt`` (weights, architecture, the latent scale factor
computed from the training data), ``checkpoints/last.pt`` (full state, ``autoencoder.resume=true``
continues it), ``reconstructions.png`` (held-out images over their reconstructions), ``history.json``,
``loss_curve.png``. MLflow: losses, reconstruction PSNR / SSIM, the scale factor, the figure.
"""

from __future__ import annotations

from typing import Any

from medsynth.config import Config
from medsynth.data.prepare import load_split, load_summary
from medsynth.errors import MedsynthError
from medsynth.figures import loss_curve
from medsynth.io.atomic import atomic_write_json
from medsynth.training.autoencoder import train_autoencoder
from pipelines.stage import StageContext


def preflight(config: Config) -> None:
    """The perceptual network's local weights file must load into it before any stage runs."""
    cfg = config.autoencoder
    if cfg.perceptual_weight > 0:
        from medsynth.models.autoencoder import PerceptualFeatures

        PerceptualFeatures(config.data.spatial_dims, cfg.perceptual_depth, cfg.perceptual_weights)


def run(ctx: StageContext) -> dict[str, Any]:
    config, work = ctx.config, ctx.work
    cache = ctx.inputs["prepare"] / "cache"
    summary = load_summary(cache)
    train = load_split(cache, "train")
    val = load_split(cache, "val")
    if list(train["images"].shape[2:]) != list(config.data.image_size):
        raise MedsynthError(
            f"{cache}: cached inputs are {list(train['images'].shape[2:])} but data.image_size is "
            f"{config.data.image_size}; "
            "rerun 'medsynth prepare'"
        )
    if ctx.tracker.enabled:
        ctx.tracker.log_dataset(
            train["images"],
            source=str((cache / "train_images.npy").resolve()),
            name=f"{config.name}-train",
            context="training",
        )

    result = train_autoencoder(
        config.autoencoder,
        train["images"],
        val["images"],
        ctx.run_settings(),
        spatial_dims=config.data.spatial_dims,
        intensity=summary["intensity"],
    )
    if not ctx.dist.is_main:
        return {}
    atomic_write_json(work / "history.json", result.history)
    loss_curve(result.history, work / "loss_curve.png")
    ctx.tracker.log_metrics(
        {"autoencoder/scale_factor": result.scale_factor}
        | {f"autoencoder/final_{k.replace('/', '_')}": v for k, v in result.val_metrics.items()}
    )
    for name in ("loss_curve.png", "reconstructions.png"):
        if (work / name).is_file():
            ctx.tracker.log_artifact(work / name)
    latent = [s // config.autoencoder.downsample for s in config.data.image_size]
    return {
        "steps": result.steps,
        "scale_factor": result.scale_factor,
        "latent_shape": [config.autoencoder.latent_channels, *latent],
        "resumed_from": result.resumed_from,
        **{k: round(v, 4) for k, v in result.val_metrics.items()},
        "mlflow_run_id": ctx.tracker.run_id or None,
    }
