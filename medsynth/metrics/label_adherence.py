"""Does an image generated from a label map put its tissues where the map says?

Two measures, each beside a reference computed the same way on real images:

- per-label mean intensity of the generated images inside each label of their maps, against the
  same on held-out real images with their own label maps;
- Dice of a simple segmentation: every voxel gets the label whose real mean intensity is nearest
  (thresholds halfway between the sorted real means), compared with the map it was generated from.
  The same segmentation of the real images against their true maps is the ceiling (tissues of similar
  intensity cannot be told apart by intensity at all), and the generated images against *other*
  samples' maps (a shuffled pairing) is the floor that ignores the map.
Written by hand: a nearest-mean segmentation and per-label statistics are not in MONAI.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot


def label_means(images: np.ndarray, maps: np.ndarray, num_labels: int) -> np.ndarray:
    """Mean intensity inside each label (NaN where the label never occurs), over all images."""
    images, maps = np.asarray(images, dtype=np.float64).ravel(), np.asarray(maps).ravel().astype(np.int64)
    sums = np.bincount(maps, weights=images, minlength=num_labels)[:num_labels]
    counts = np.bincount(maps, minlength=num_labels)[:num_labels]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def nearest_mean_segmentation(images: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Each voxel -> the label whose mean is nearest (labels with NaN means are never chosen)."""
    valid = np.flatnonzero(np.isfinite(means))
    distance = np.abs(np.asarray(images, dtype=np.float64)[..., None] - means[valid])
    return valid[np.argmin(distance, axis=-1)]


def mean_dice(segmentation: np.ndarray, maps: np.ndarray, num_labels: int) -> tuple[float, np.ndarray]:
    """Mean Dice over the labels present in ``maps`` (background 0 included), and the per-label values
    (NaN for labels absent from both), with MONAI's ``compute_dice``."""
    pred = one_hot(torch.as_tensor(segmentation.astype(np.int64)), num_labels, dim=1)
    true = one_hot(torch.as_tensor(np.asarray(maps).astype(np.int64)), num_labels, dim=1)
    per_image = compute_dice(pred, true, include_background=True, ignore_empty=True)  # (N, labels), NaN where empty
    per_label = torch.nanmean(per_image, dim=0).numpy()
    return float(np.nanmean(per_label)), per_label


def label_adherence(
    fake: np.ndarray,
    fake_maps: np.ndarray,
    real: np.ndarray,
    real_maps: np.ndarray,
    num_labels: int,
    names: dict[int, str] | None = None,
) -> dict[str, float]:
    """The measures of the module docstring as ``{name: value}`` (images ``(N, 1, *spatial)``, maps alike)."""
    names = names or {}
    real_means = label_means(real, real_maps, num_labels)
    fake_means = label_means(fake, fake_maps, num_labels)
    out: dict[str, float] = {}
    for k in range(num_labels):
        if np.isfinite(real_means[k]) and np.isfinite(fake_means[k]):
            name = names.get(k, str(k))
            out[f"label/{name}/mean_fake"] = float(fake_means[k])
            out[f"label/{name}/mean_real"] = float(real_means[k])
    finite = np.isfinite(real_means) & np.isfinite(fake_means)
    out["label/mean_abs_difference"] = float(np.mean(np.abs(real_means[finite] - fake_means[finite])))
    out["label/dice"], _ = mean_dice(nearest_mean_segmentation(fake, real_means), fake_maps, num_labels)
    out["label/dice_real"], _ = mean_dice(nearest_mean_segmentation(real, real_means), real_maps, num_labels)
    shuffled = np.roll(fake_maps, 1, axis=0) if len(fake_maps) > 1 else fake_maps
    out["label/dice_shuffled"], _ = mean_dice(nearest_mean_segmentation(fake, real_means), shuffled, num_labels)
    return out
