"""train: cached model inputs -> diffusion model (checkpoint + EMA model file + MLflow model).

Runs unchanged under ``torchrun --nproc_per_node=N -m medsynth train CONFIG`` (DDP, gloo on CPU,
nccl on GPUs); rank 0 alone logs and writes. Outputs (``output_dir/train/``): ``model.pt`` (EMA
weights), ``checkpoints/last.pt`` (full state), ``loss_curve.png``, ``history.json``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from medsynth.config import to_plain
from medsynth.data.prepare import load_split, load_summary, load_volumes
from medsynth.errors import MedsynthError
from medsynth.figures import loss_curve
from medsynth.io.atomic import atomic_save_npy, atomic_write_json, file_digest
from medsynth.models.loading import load_trained_model
from medsynth.training.trainer import preprocessing_of, train_diffusion
from pipelines.stage import StageContext


def encode_latents(
    ctx: StageContext, images: np.ndarray, val_images: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Latent diffusion: the training and validation images encoded once by the autoencoder stage's model
    (posterior means times the scale factor), plus what the model file embeds and what a resumed
    checkpoint must match (the autoencoder's digest)."""
    from medsynth.models.autoencoder import autoencoder_state, encode, load_autoencoder

    path = ctx.inputs["autoencoder"] / "autoencoder.pt"
    autoencoder = load_autoencoder(path, ctx.dist.device)
    batch = max(1, ctx.config.autoencoder.batch_size)
    latents = encode(autoencoder, images, batch_size=batch, device=ctx.dist.device)
    val_latents = encode(autoencoder, val_images, batch_size=batch, device=ctx.dist.device)
    if ctx.dist.is_main:
        print(
            f"train: {len(latents)} latents of shape {list(latents.shape[1:])} (std {latents.std():.3f}) from {path}",
            file=sys.stderr,
        )
    return (
        latents,
        val_latents,
        {
            "state": {"autoencoder": autoencoder_state(autoencoder)},
            "identity": {"autoencoder_sha256": file_digest(path)},
        },
    )


def run(ctx: StageContext) -> dict[str, Any]:
    config, work = ctx.config, ctx.work
    cache = ctx.inputs["prepare"] / "cache"
    summary = load_summary(cache)
    train = load_split(cache, "train")
    val = load_split(cache, "val")
    if list(train["images"].shape[2:]) != list(config.data.image_size):
        raise MedsynthError(
            f"{cache}: cached inputs are {list(train['images'].shape[2:])} but data.image_size is "
            f"{config.data.image_size}; rerun 'medsynth prepare'"
        )

    if ctx.tracker.enabled:
        digest = ctx.tracker.log_dataset(
            train["images"],
            source=str((cache / "train_images.npy").resolve()),
            name=f"{config.name}-train",
            context="training",
            targets=train["classes"],
        )
        ctx.tracker.log_dataset(
            val["images"],
            source=str((cache / "val_images.npy").resolve()),
            name=f"{config.name}-validation",
            context="validation",
        )
        ctx.tracker.set_tags({"medsynth.dataset_digest": digest})

    inputs, val_inputs, latent = train["images"], val["images"], {}
    if config.data.patches is not None:
        # random crops of the whole scans at their own spacing (the cached inputs are fixed crops)
        scans = load_volumes(cache, "train")
        inputs, train["classes"] = scans.patch_set(config.data), np.asarray(scans.classes, dtype=np.int64)
    if config.diffusion.space == "latent":
        inputs, val_inputs, latent = encode_latents(ctx, inputs, val_inputs)
    result = train_diffusion(
        config.model,
        config.diffusion,
        config.train,
        inputs,
        val_inputs,
        ctx.run_settings(),
        preprocessing=preprocessing_of(config.data, summary["spacing_mm"]),
        intensity=summary["intensity"],
        train_classes=train["classes"] if config.model.num_classes else None,
        val_classes=val["classes"] if config.model.num_classes else None,
        extra_state=latent.get("state"),
        identity_extra=latent.get("identity"),
    )
    if not ctx.dist.is_main:
        return {}

    atomic_write_json(work / "history.json", result.history)
    loss_curve(result.history, work / "loss_curve.png")
    ctx.tracker.log_artifact(work / "loss_curve.png")
    last = result.history[-1] if result.history else {}
    if latent:
        atomic_save_npy(work / "latents_train.npy", inputs)
    model_uri = None
    if config.tracking.log_model and ctx.tracker.enabled:
        trained = load_trained_model(result.model_path)
        model_uri = ctx.tracker.log_model(
            trained.network,
            registered_name=config.tracking.registered_model,
            alias=config.tracking.model_alias,
            metadata={
                "spatial_dims": trained.spatial_dims,
                "image_size": trained.output_size,
                "model_input_size": trained.image_size,
                "latent": trained.is_latent,
                "num_classes": trained.num_classes,
                "diffusion": to_plain(config.diffusion),
                "intensity": summary["intensity"],
                "medsynth_model_file": "model.pt",
            },
        )
        ctx.tracker.log_artifact(result.model_path, artifact_path="medsynth")
    return {
        "steps": result.steps,
        "final_loss": last.get("train/loss"),
        "val_loss": last.get("val/loss"),
        "images_per_s": last.get("train/images_per_s"),
        "resumed_from": result.resumed_from,
        "model_uri": model_uri,
        "mlflow_run_id": ctx.tracker.run_id or None,
    }
