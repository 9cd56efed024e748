"""Noise-level estimation: Gaussian (wavelet MAD), Rician from the background, CT in HU.

Each returns the standard deviation of the underlying Gaussian noise in the image's own units.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.restoration import estimate_sigma


def estimate_gaussian_sigma(image: np.ndarray) -> float:
    """Donoho's wavelet estimate (median absolute deviation of the finest diagonal detail / 0.6745),
    scikit-image ``estimate_sigma``; robust to edges, biased low for spatially correlated noise."""
    image = np.asarray(image, dtype=np.float64)
    return float(estimate_sigma(image, channel_axis=None))


def _border_background(magnitude: np.ndarray) -> np.ndarray:
    """Voxels below Otsu's threshold that connect to the image border (the air around a head or
    body), eroded once against partial volume. Dark tissue inside (skull, CSF) is not connected."""
    low = magnitude < threshold_otsu(magnitude)
    labels, _ = ndimage.label(low)
    edge_labels = set()
    for axis in range(low.ndim):
        for index in (0, -1):
            edge_labels.update(np.unique(np.take(labels, index, axis=axis)).tolist())
    edge_labels.discard(0)
    outside = np.isin(labels, sorted(edge_labels))
    return ndimage.binary_erosion(outside, border_value=1)


def estimate_rician_sigma(magnitude: np.ndarray, background: np.ndarray | None = None) -> float:
    """sigma of magnitude-MRI noise from signal-free background.

    Where the signal is zero the magnitude is Rayleigh distributed, whose median is
    ``sigma * sqrt(2 ln 2)`` (Gudbjartsson & Patz 1995 for the distribution); the median resists
    the few tissue voxels that leak into a background selection far better than the second moment.
    Without a mask, the background is the air connected to the image border below Otsu's threshold
    (dark tissue such as skull lies inside the head and is not connected); when the scan has no such
    border region, every voxel below Otsu's threshold. Measured on the brain phantom (tests): within
    10 % at sigma = 2.5-10 % of the foreground's 99th percentile; with a known ``background`` mask
    within 8 %.

    Raises:
        ValueError: no usable background (fewer than 50 voxels).
    """
    magnitude = np.asarray(magnitude, dtype=np.float64)
    if background is None:
        background = _border_background(magnitude)
        if background.sum() < 50:
            background = magnitude < threshold_otsu(magnitude)
    values = magnitude[np.asarray(background, dtype=bool)]
    if values.size < 50:
        raise ValueError("no signal-free background to estimate Rician noise from (fewer than 50 voxels)")
    return float(np.median(values) / np.sqrt(2.0 * np.log(2.0)))


def estimate_ct_sigma_hu(hu: np.ndarray, *, window_hu: tuple[float, float] = (-150.0, 150.0), block: int = 5) -> float:
    """Robust noise level of a CT image in HU from small in-plane blocks of fat / soft tissue.

    Unlike the wavelet estimate this sees the spatially correlated noise of filtered
    back-projection. Blocks that straddle a tissue boundary have a much larger spread than uniform
    ones; a first guess (the 20th percentile of the block standard deviations) sets a cut at 1.5x,
    and the median of the blocks below it is the estimate.

    Raises:
        ValueError: fewer than 5 usable blocks.
    """
    hu = np.asarray(hu, dtype=np.float64)
    stds = _block_stds(hu, window_hu, block)
    if len(stds) < 5 and block > 3:
        stds = _block_stds(hu, window_hu, 3)  # small images: smaller blocks
    if len(stds) < 5:
        raise ValueError("too little fat/soft tissue to estimate CT noise (fewer than 5 blocks)")
    stds_array = np.asarray(stds)
    first_guess = np.percentile(stds_array, 20)
    return float(np.median(stds_array[stds_array <= 1.5 * first_guess]))


def _block_stds(hu: np.ndarray, window_hu: tuple[float, float], block: int) -> list[float]:
    """Standard deviations of the in-plane ``block x block`` tiles whose median lies in ``window_hu``."""
    planes = [hu] if hu.ndim == 2 else [hu[..., k] for k in range(hu.shape[-1])]
    stds = []
    for plane in planes:
        for corner in np.ndindex(plane.shape[0] // block, plane.shape[1] // block):
            patch = plane[corner[0] * block : (corner[0] + 1) * block, corner[1] * block : (corner[1] + 1) * block]
            if window_hu[0] < np.median(patch) < window_hu[1]:
                stds.append(float(patch.std(ddof=1)))
    return stds
