"""From a scan on disk to model inputs: MONAI transforms plus invertible intensity conventions.

Geometry (orientation, spacing, size) uses MONAI's array transforms on ``MetaTensor``s. Intensities
follow one convention per modality, each invertible so that outputs go back to the input's units:

- CT: a Hounsfield window ``[low, high]`` mapped linearly to ``[-1, 1]`` (MONAI ``ScaleIntensityRange``).
- MR: the ``p``-th percentile of the foreground mapped to 1 and 0 to -1 (written here: MONAI's
  ``ScaleIntensityRangePercentiles`` has no foreground mask).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Resize, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

from medsynth.config import DataConfig


@dataclass(frozen=True)
class Intensity:
    """An invertible intensity convention: ``normalised = scale * raw + offset`` then clipped to [-1, 1]."""

    modality: str
    low: float  # raw value mapped to -1
    high: float  # raw value mapped to +1

    def forward(self, raw: np.ndarray | torch.Tensor):
        if self.modality == "ct":
            return ScaleIntensityRange(a_min=self.low, a_max=self.high, b_min=-1.0, b_max=1.0, clip=True)(raw)
        scaled = 2.0 * (raw - self.low) / (self.high - self.low) - 1.0
        return scaled.clip(-1.0, 1.0)

    def inverse(self, normalised: np.ndarray | torch.Tensor):
        return (normalised + 1.0) / 2.0 * (self.high - self.low) + self.low

    def as_dict(self) -> dict:
        return {"modality": self.modality, "low": self.low, "high": self.high}


def foreground_mask(raw: np.ndarray) -> np.ndarray:
    """Voxels brighter than 10 % of the robust maximum: the head/body in an MR image."""
    robust_max = float(np.percentile(raw, 99.0))
    return raw > 0.1 * robust_max


CT_BODY_HU = -500.0  # between air (-1000) and fat (-100): everything inside the body


def scan_foreground(raw: np.ndarray, modality: str) -> np.ndarray:
    """The head/body of a scan in its units: MR :func:`foreground_mask`; CT voxels above ``CT_BODY_HU``."""
    raw = np.asarray(raw)
    if modality == "mr":
        return np.asarray(foreground_mask(raw), dtype=bool)
    if modality == "ct":
        return raw > CT_BODY_HU
    raise ValueError(f"modality must be 'mr' or 'ct', got {modality!r}")


def intensity_for(raw: np.ndarray, data: DataConfig, modality: str) -> Intensity:
    """The per-case convention for ``raw`` intensities of ``modality``."""
    if modality == "ct":
        return Intensity("ct", float(data.ct_window[0]), float(data.ct_window[1]))
    mask = foreground_mask(raw)
    values = raw[mask] if mask.any() else raw.ravel()
    high = float(np.percentile(values, data.mr_percentile))
    if not np.isfinite(high) or high <= 0:
        high = float(raw.max()) if raw.max() > 0 else 1.0
    return Intensity("mr", 0.0, high)


def to_meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """A channel-first ``MetaTensor`` carrying the affine (2D images get the 2D part)."""
    return MetaTensor(
        torch.as_tensor(array[None], dtype=torch.float32), affine=torch.as_tensor(affine, dtype=torch.float64)
    )


def reorient_resample(image: MetaTensor, data: DataConfig, *, label: bool = False) -> MetaTensor:
    """RAS orientation, then optional resampling to ``data.pixdim`` (nearest for label maps)."""
    with warnings.catch_warnings():
        # MONAI 1.6 warns about a future default of ``labels``; RAS axis labels are what is meant.
        warnings.simplefilter("ignore", FutureWarning)
        image = Orientation(axcodes="RAS"[: image.ndim - 1])(image)
    if data.pixdim is not None:
        pixdim = data.pixdim[: image.ndim - 1]
        image = Spacing(pixdim=pixdim, mode="nearest" if label else "bilinear")(image)
    return image


def planned_shape(shape: tuple[int, ...], affine: np.ndarray, data: DataConfig) -> list[int]:
    """The spatial shape :func:`model_volume` gives a scan of ``shape`` and ``affine``, without touching voxels
    (MONAI's lazy Orientation / Spacing compute the output shape only)."""
    image = MetaTensor(torch.zeros(1).expand(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        image = Orientation(axcodes="RAS"[: len(shape)], lazy=True)(image)
    if data.pixdim is not None:
        image = Spacing(pixdim=data.pixdim[: len(shape)], lazy=True)(image)
    planned = [int(s) for s in image.peek_pending_shape()]
    if data.spatial_dims == 2 and len(planned) == 3 and planned[2] == 1:
        planned = planned[:2]
    return planned


def fit_size(image: MetaTensor, size: list[int], data: DataConfig, *, label: bool = False) -> MetaTensor:
    """Resize (area for images, nearest for labels) or pad/crop to the model size."""
    if data.resize_mode == "pad_crop":
        return ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=-1.0 if not label else 0)(image)
    return Resize(spatial_size=size, mode="nearest" if label else "area")(image)


def slice_indices(volume: np.ndarray, axis: int, fraction: float, mask: np.ndarray | None) -> list[int]:
    """The central ``fraction`` of slices along ``axis`` that hold some foreground."""
    depth = volume.shape[axis]
    keep = max(1, int(round(depth * fraction)))
    start = (depth - keep) // 2
    chosen = list(range(start, start + keep))
    if mask is not None:
        other = tuple(a for a in range(volume.ndim) if a != axis)
        filled = mask.mean(axis=other) > 0.05
        chosen = [i for i in chosen if filled[i]] or chosen
    return chosen


def model_spacing(spacing: list[float], shape: list[int], data: DataConfig) -> list[float]:
    """Voxel spacing (mm) after :func:`fit_size` turned ``shape`` into ``data.image_size``."""
    if data.resize_mode == "pad_crop":
        return [float(s) for s in spacing]
    return [float(s) * n / m for s, n, m in zip(spacing, shape, data.image_size)]


def model_inputs(
    image: np.ndarray, affine: np.ndarray, labels: np.ndarray | None, data: DataConfig, intensity: Intensity
) -> Iterator[tuple[np.ndarray, np.ndarray | None, int | None, list[float]]]:
    """Yield ``(image, labels, slice_index, spacing_mm)`` model inputs of ``data.image_size`` from one scan.

    For a 2D model and a 3D scan, one input per kept slice across ``data.slice_axis``; otherwise one.
    Images are channel-first float32 in [-1, 1]; labels channel-first uint8.
    """
    normalised = to_meta(np.asarray(intensity.forward(image), dtype=np.float32), affine)
    normalised = reorient_resample(normalised, data)
    label_meta = None
    if labels is not None:
        label_meta = reorient_resample(to_meta(labels.astype(np.float32), affine), data, label=True)
    spatial = list(normalised.shape[1:])
    pixdim = [float(p) for p in normalised.pixdim][: len(spatial)]
    if data.spatial_dims == 2 and len(spatial) == 3 and spatial[data.slice_axis] > 1:
        axis = data.slice_axis
        kept = [a for a in range(3) if a != axis]
        spacing = model_spacing([pixdim[a] for a in kept], [spatial[a] for a in kept], data)
        mask = (label_meta[0].numpy() > 0) if label_meta is not None else (normalised[0].numpy() > -0.9)
        for index in slice_indices(normalised[0].numpy(), axis, data.slice_fraction, mask):
            take = [slice(None)] * 4
            take[axis + 1] = index
            image_2d = fit_size(MetaTensor(normalised.as_tensor()[tuple(take)]), data.image_size, data)
            label_2d = None
            if label_meta is not None:
                label_2d = fit_size(MetaTensor(label_meta.as_tensor()[tuple(take)]), data.image_size, data, label=True)
            yield _arrays(image_2d, label_2d) + (index, spacing)
        return
    if data.spatial_dims == 2 and len(spatial) == 3:
        # A single-slice volume (X, Y, 1) is a 2D image.
        normalised = MetaTensor(normalised.as_tensor()[..., 0])
        label_meta = MetaTensor(label_meta.as_tensor()[..., 0]) if label_meta is not None else None
        spatial, pixdim = spatial[:2], pixdim[:2]
    image_out = fit_size(normalised, data.image_size, data)
    label_out = fit_size(label_meta, data.image_size, data, label=True) if label_meta is not None else None
    yield _arrays(image_out, label_out) + (None, model_spacing(pixdim, spatial, data))


def model_volume(
    image: np.ndarray, affine: np.ndarray, data: DataConfig, intensity: Intensity, modality: str
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """One whole scan for patch training: ``(volume, foreground, spacing_mm)`` in RAS order at the scan's
    own spacing (or ``data.pixdim``), normalised, never resized. A one-slice volume is a 2D image for a 2D
    model; a 3D scan stays 3D (a 2D model crops planes of it).

    ``volume`` is channel-first float32 in [-1, 1]; ``foreground`` boolean, from the scan in its units.
    """
    volume = reorient_resample(to_meta(np.asarray(intensity.forward(image), dtype=np.float32), affine), data)
    mask = reorient_resample(to_meta(scan_foreground(image, modality).astype(np.float32), affine), data, label=True)
    pixdim = [float(p) for p in volume.pixdim][: volume.ndim - 1]
    array, fg = volume.as_tensor().numpy(), mask.as_tensor().numpy()[0] > 0.5
    if data.spatial_dims == 2 and array.ndim == 4 and array.shape[3] == 1:
        array, fg, pixdim = array[..., 0], fg[..., 0], pixdim[:2]
    return np.ascontiguousarray(array, dtype=np.float32).clip(-1.0, 1.0), fg, pixdim


def _arrays(image: torch.Tensor, labels: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    image_np = np.asarray(torch.as_tensor(image).numpy(), dtype=np.float32).clip(-1.0, 1.0)
    labels_np = None if labels is None else np.rint(torch.as_tensor(labels).numpy()).astype(np.uint8)
    return image_np, labels_np
