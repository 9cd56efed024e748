"""A denoising prior fitted on scans held in memory: random patches at their own spacing, one engine run.

The pipeline trains priors from a prepared folder (``prepare`` -> ``train``); this is the same trainer
(:func:`~medsynth.training.trainer.train_diffusion` over a :class:`~medsynth.data.patches.PatchSet`)
for scans that are already in memory: the noisy scans of ``medsynth denoise --self-supervised`` (a
prior of the *noisy* data, :func:`medsynth.denoise.prior.noisy_prior_denoise`) and the benchmarks.
No MLflow run, no datalist: the model file in ``work_dir`` records what it was fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config import Config
from medsynth.data.patches import PatchSet, plane_axes
from medsynth.data.transforms import Intensity, model_volume
from medsynth.training.engine import RunSettings
from medsynth.training.trainer import TrainResult, preprocessing_of, train_diffusion


def fit_scan_prior(
    scans: Sequence[tuple[np.ndarray, np.ndarray]],
    intensities: Sequence[Intensity],
    config: Config,
    work_dir: Path,
    *,
    modality: str,
    record: dict[str, Any] | None = None,
    progress: str | None = "fit",
) -> TrainResult:
    """Train ``config``'s pixel-space diffusion model on random crops of ``scans``.

    Args:
        scans: ``(array, affine)`` per scan, in the scans' units (2D or 3D).
        intensities: each scan's intensity convention (to the model's [-1, 1] units).
        config: ``data`` (crop size, ``patches``, slice axis), ``model``, ``diffusion`` and ``train``
            sections and the seed; ``data.patches`` must be set.
        work_dir: where ``model.pt`` and ``checkpoints/last.pt`` go (an interrupted fit resumes).
        modality: ``mr`` or ``ct`` (the foreground that crops are centred on).
        record: more entries for the model file's ``data`` record (e.g. ``self_supervised``).
        progress: the progress label; None: quiet.

    Returns:
        The trainer's result (``model_path`` is the model file).

    Raises:
        MedsynthError: a scan smaller than the crop.
    """
    data = config.data
    assert data.patches is not None, "fit_scan_prior needs data.patches"
    volumes, masks, spacings = [], [], []
    for (array, affine), intensity in zip(scans, intensities):
        volume, mask, spacing = model_volume(array, affine, data, intensity, modality)
        if data.spatial_dims == 2 and volume.ndim == 4:
            spacing = [s for a, s in enumerate(spacing) if a != data.slice_axis]
        volumes.append(volume)
        masks.append(mask)
        spacings.append(spacing)
    patches = PatchSet(
        volumes,
        masks,
        data.image_size,
        per_scan=data.patches.per_scan,
        foreground=data.patches.foreground,
        axes=plane_axes(data.patches.axes, data.slice_axis),
        flips=data.patches.flips,
        rotations=data.patches.rotations,
        names=[f"scan {i}" for i in range(len(volumes))],
    )
    # the validation loss watches fixed crops of the same scans (there is no held-out scan here)
    val = patches.fixed(max(1, config.train.val_images // len(volumes)), config.seed + 1)
    spacing = np.median(np.asarray(spacings, dtype=np.float64), axis=0).tolist()
    return train_diffusion(
        config.model,
        config.diffusion,
        config.train,
        patches,
        val,
        RunSettings(seed=config.seed, work_dir=Path(work_dir), progress=progress),
        preprocessing=preprocessing_of(data, spacing) | (record or {}),
        intensity=intensities[0].as_dict(),
    )
