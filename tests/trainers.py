"""Test adapters: run each trainer from a whole test ``Config`` (the trainers take their own sections plus
:class:`~medsynth.training.engine.RunSettings`; tests build configs whole)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.config import Config
from medsynth.runtime import DistContext
from medsynth.training.autoencoder import AutoencoderResult, train_autoencoder
from medsynth.training.controlnet import ControlNetResult, train_controlnet
from medsynth.training.engine import CPU, RunSettings
from medsynth.training.trainer import TrainResult, preprocessing_of, train_diffusion


def settings(config: Config, work: Path, dist: DistContext = CPU, **kwargs) -> RunSettings:
    return RunSettings(seed=config.seed, work_dir=Path(work), dist=dist, progress=None, **kwargs)


def diffusion(
    config: Config,
    images: np.ndarray,
    val: np.ndarray,
    work: Path,
    dist: DistContext = CPU,
    *,
    step_callback=None,
    log_metrics=None,
    **kwargs,
) -> TrainResult:
    return train_diffusion(
        config.model,
        config.diffusion,
        config.train,
        images,
        val,
        settings(config, work, dist, step_callback=step_callback, log_metrics=log_metrics),
        preprocessing=kwargs.pop("preprocessing", preprocessing_of(config.data, None)),
        **kwargs,
    )


def autoencoder(
    config: Config,
    images: np.ndarray,
    val: np.ndarray,
    work: Path,
    dist: DistContext = CPU,
    *,
    step_callback=None,
    log_metrics=None,
    **kwargs,
) -> AutoencoderResult:
    return train_autoencoder(
        config.autoencoder,
        images,
        val,
        settings(config, work, dist, step_callback=step_callback, log_metrics=log_metrics),
        spatial_dims=config.data.spatial_dims,
        **kwargs,
    )


def controlnet(
    config: Config,
    base,
    images,
    labels,
    val_images,
    val_labels,
    work: Path,
    dist: DistContext = CPU,
    *,
    step_callback=None,
    log_metrics=None,
    **kwargs,
) -> ControlNetResult:
    return train_controlnet(
        config.controlnet,
        base,
        images,
        labels,
        val_images,
        val_labels,
        settings(config, work, dist, step_callback=step_callback, log_metrics=log_metrics),
        **kwargs,
    )
