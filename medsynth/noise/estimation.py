"""Noise-level estimation: Gaussian (wavelet MAD), Rician from the background, CT in HU.

Each returns the standard deviation of the underlying Gaussian noise in the image's own units.
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu
from skimage.restoration import estimate_sigma


def estimate_gaussian_sigma(image: np.ndarray) -> float:
    """Donoho's wavelet estimate (median absolute deviation of the finest diagonal detail / 0.6745),
    scikit-image ``estimate_sigma``; robust to edges, biased low for spatially correlated noise."""
    image = np.asarray(image, dtype=np.float64)
    return float(estimate_sigma(image, channel_axis=None))


def estimate_rician_sigma(magnitude: np.ndarray, background: np.ndarray | None = None) -> float:
    """sigma of magnitude-MRI noise from signal-free background.

    Where the signal is zero the magnitude is Rayleigh distributed with ``E[M^2] = 2 sigma^2``
    (Gudbjartsson & Patz 1995), so ``sigma = sqrt(mean(M^2) / 2)`` over the background. Without a
    mask, the background is what lies below Otsu's threshold and within 3.5 sigma of zero (refined
    once; the Rayleigh tail beyond 3.5 sigma holds 0.2 % of it). Dark tissue bordering the background
    (skull in T1) leaks into that selection at high noise and biases the estimate up (measured up to
    +17 % at sigma = 10 % of the foreground's 99th percentile on the brain phantom); pass a
    ``background`` mask where one is known (within 8 % in the tests).

    Raises:
        ValueError: no usable background (fewer than 50 voxels).
    """
    magnitude = np.asarray(magnitude, dtype=np.float64)
    if background is None:
        candidates = magnitude < threshold_otsu(magnitude)
        sigma = np.sqrt(np.mean(magnitude[candidates] ** 2) / 2.0) if candidates.sum() >= 50 else 0.0
        background = candidates & (magnitude < 3.5 * sigma)
    values = magnitude[np.asarray(background, dtype=bool)]
    if values.size < 50:
        raise ValueError("no signal-free background to estimate Rician noise from (fewer than 50 voxels)")
    return float(np.sqrt(np.mean(values**2) / 2.0))


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
    planes = [hu] if hu.ndim == 2 else [hu[..., k] for k in range(hu.shape[-1])]
    stds = []
    for plane in planes:
        for corner in np.ndindex(plane.shape[0] // block, plane.shape[1] // block):
            patch = plane[corner[0] * block : (corner[0] + 1) * block, corner[1] * block : (corner[1] + 1) * block]
            if window_hu[0] < np.median(patch) < window_hu[1]:
                stds.append(patch.std(ddof=1))
    if len(stds) < 5:
        raise ValueError("too little fat/soft tissue to estimate CT noise (fewer than 5 blocks)")
    stds_array = np.asarray(stds)
    first_guess = np.percentile(stds_array, 20)
    return float(np.median(stds_array[stds_array <= 1.5 * first_guess]))
