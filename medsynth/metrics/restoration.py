"""Restoration quality: PSNR and SSIM (MONAI) over the whole image and inside a foreground mask.

The whole-image values are MONAI's ``PSNRMetric`` and ``SSIMMetric``. The masked ones are computed
from the same quantities: PSNR from the mean squared error over the mask, SSIM as the mean over the
mask of MONAI's per-voxel SSIM map (``compute_ssim_and_cs``). That map comes from an *unpadded*
convolution with a ``k``-wide window, so it covers the valid region only: map index ``i`` is the
window centred on voxel ``i + (k - 1) / 2``, and the mask is cropped by ``(k - 1) / 2`` on each side
to line up with it. The whole-image SSIM is the mean of that same map.

PSNR of identical images is ``inf`` (MONAI's value, kept): it is the honest answer, and callers that
average or log PSNR must handle it.

With a mask there is also the contrast slope ``slope_fg``: the least-squares slope of the estimate's
intensities against the reference's over the mask voxels (ordinary regression with an intercept,
``cov(estimate, reference) / var(reference)``). PSNR and SSIM reward a denoiser that flattens the image
towards its local mean; the slope says what that costs: 1.0 means the grey/white (or soft-tissue)
contrast survives, below 1 that the denoiser compressed it (0.8: contrast reduced by a fifth), above 1
that it exaggerated it. An offset does not change it. It is NaN when the reference is constant inside
the mask (there is no contrast to keep).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs

from medsynth.data.transforms import scan_foreground

SSIM_KERNEL = 7  # window side; 7 rather than Wang et al.'s 11 so 32-64 px images keep a useful valid region
SSIM_KERNEL_SIGMA = 1.5  # Gaussian window (Wang et al. 2004)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_kernel(shape: tuple[int, ...]) -> int:
    """SSIM window side for spatial ``shape``: ``SSIM_KERNEL``, or the largest odd ``<= min(shape) / 2``
    for tiny images (so the valid region keeps at least half of each side); at least 1."""
    half_side = min(int(n) for n in shape) // 2
    if half_side >= SSIM_KERNEL:
        return SSIM_KERNEL
    return max(1, half_side if half_side % 2 else half_side - 1)


def restoration_settings(shape: tuple[int, ...], data_range: float) -> dict[str, Any]:
    """What :func:`restoration_metrics` uses for spatial ``shape``, for callers to log next to the values."""
    return {
        "data_range": float(data_range),
        "spatial_dims": len(shape),
        "ssim_kernel_size": ssim_kernel(shape),
        "ssim_kernel_sigma": SSIM_KERNEL_SIGMA,
        "ssim_kernel_type": "gaussian",
        "ssim_k1": SSIM_K1,
        "ssim_k2": SSIM_K2,
        "ssim_region": "valid (unpadded) windows only",
    }


def foreground(reference: np.ndarray, modality: str) -> np.ndarray:
    """Where to measure: the head/body. MR: :func:`~medsynth.data.transforms.foreground_mask` (above
    10 % of the 99th percentile); CT: voxels above ``CT_BODY_HU`` (-500 HU)."""
    return scan_foreground(reference, modality)


def _tensor(array: np.ndarray, spatial_dims: int) -> torch.Tensor:
    # (batch, channel, *spatial); a leading channel axis is kept when the array has one.
    tensor = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64))
    return tensor[None, None] if array.ndim == spatial_dims else tensor[None]


def _validate(
    estimate: np.ndarray, reference: np.ndarray, data_range: float, mask: np.ndarray | None, spatial_dims: int | None
) -> int:
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate and reference shapes differ: {estimate.shape} vs {reference.shape}")
    spatial_dims = reference.ndim if spatial_dims is None else spatial_dims
    if spatial_dims not in (2, 3) or reference.ndim not in (spatial_dims, spatial_dims + 1):
        raise ValueError(
            f"expected a 2D or 3D image (optionally channel-first), got shape {reference.shape} "
            f"with spatial_dims={spatial_dims}"
        )
    if not (np.isfinite(estimate).all() and np.isfinite(reference).all()):
        raise ValueError("estimate or reference has NaN/Inf values")
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range}")
    if mask is not None:
        if mask.dtype != bool or mask.shape != reference.shape:
            raise ValueError(f"mask must be a boolean array of shape {reference.shape}, got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise ValueError("mask is empty")
    return spatial_dims


def _psnr(squared_error: float, data_range: float) -> float:
    return float("inf") if squared_error == 0 else float(10.0 * np.log10(data_range**2 / squared_error))


def contrast_slope(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Least-squares slope of ``estimate`` against ``reference`` (both flattened), with an intercept.

    Args:
        estimate: the estimate's values (e.g. the mask voxels).
        reference: the reference's values at the same voxels.

    Returns:
        ``cov(estimate, reference) / var(reference)``; NaN when ``reference`` is constant, exactly 0 when
        ``estimate`` is (rather than a rounding residue of its mean).
    """
    x = np.asarray(reference, dtype=np.float64).ravel()
    y = np.asarray(estimate, dtype=np.float64).ravel()
    if x.size == 0 or x.min() == x.max():
        return float("nan")
    if y.min() == y.max():
        return 0.0
    centred = x - x.mean()
    return float(np.dot(centred, y - y.mean()) / np.dot(centred, centred))


def restoration_metrics(
    estimate: np.ndarray,
    reference: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    spatial_dims: int | None = None,
) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``estimate`` against ``reference``, whole image and inside ``mask``; with a
    mask, also the contrast slope inside it.

    Args:
        estimate: denoised / synthesised image, ``(X, Y[, Z])`` or channel-first ``(C, X, Y[, Z])``.
        reference: the clean image, same shape.
        data_range: the intensity span the scores are relative to (e.g. ``clean.max() - clean.min()``,
            or the CT window width); sets PSNR's peak and SSIM's constants ``(k1 L)^2, (k2 L)^2``.
        mask: boolean foreground of the same shape (see :func:`foreground`), adds ``psnr_fg``/``ssim_fg``/``slope_fg``.
        spatial_dims: 2 or 3; default ``reference.ndim`` (then there is no channel axis).

    Returns:
        ``{"psnr", "ssim"}`` plus ``{"psnr_fg", "ssim_fg", "slope_fg"}`` with a mask. PSNR is ``inf`` for
        identical images. ``ssim_fg`` is NaN when no mask voxel lies in the SSIM's valid region (within
        ``(k - 1) / 2`` voxels of the border only). ``slope_fg`` is the least-squares slope of the
        estimate's mask voxels against the reference's (:func:`contrast_slope`, regression with an
        intercept): 1.0 when the contrast survives, < 1 when the estimate compressed it (the intensities
        pulled towards their mean), > 1 when it was stretched; NaN when the reference is constant inside
        the mask. The settings used: :func:`restoration_settings`.

    Raises:
        ValueError: shapes differ, non-finite values, ``data_range <= 0``, or a bad/empty mask.
    """
    estimate, reference = np.asarray(estimate), np.asarray(reference)
    mask = None if mask is None else np.asarray(mask)
    spatial_dims = _validate(estimate, reference, data_range, mask, spatial_dims)
    shape = reference.shape[-spatial_dims:]
    kernel = ssim_kernel(shape)
    y_pred, y = _tensor(estimate, spatial_dims), _tensor(reference, spatial_dims)

    result = {"psnr": float(PSNRMetric(max_val=float(data_range), reduction="mean")(y_pred, y).item())}
    if mask is None:
        ssim_metric = SSIMMetric(
            spatial_dims=spatial_dims,
            data_range=float(data_range),
            kernel_type="gaussian",
            win_size=kernel,
            kernel_sigma=SSIM_KERNEL_SIGMA,
            k1=SSIM_K1,
            k2=SSIM_K2,
        )
        result["ssim"] = float(ssim_metric(y_pred, y).item())
        return result

    # With a mask, one map serves both values: SSIMMetric is exactly this map's mean, and on CPU the
    # convolutions are the cost (about 0.1 s for a 24^3 volume).
    ssim_map, _ = compute_ssim_and_cs(
        y_pred,
        y,
        spatial_dims=spatial_dims,
        kernel_size=(kernel,) * spatial_dims,
        kernel_sigma=(SSIM_KERNEL_SIGMA,) * spatial_dims,
        data_range=float(data_range),
        kernel_type="gaussian",
        k1=SSIM_K1,
        k2=SSIM_K2,
    )
    result["ssim"] = float(ssim_map.mean().item())
    squared = (estimate.astype(np.float64) - reference.astype(np.float64)) ** 2
    result["psnr_fg"] = _psnr(float(squared[mask].mean()), float(data_range))
    half = (kernel - 1) // 2
    valid = (Ellipsis, *(slice(half, n - half) for n in shape))
    inside = torch.as_tensor(mask[valid]).reshape(ssim_map.shape)
    result["ssim_fg"] = float(ssim_map[inside].mean().item()) if bool(inside.any()) else float("nan")
    result["slope_fg"] = contrast_slope(estimate[mask], reference[mask])
    return result
