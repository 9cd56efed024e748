"""Rician bias correction for magnitude MRI."""

from __future__ import annotations

import numpy as np


def rician_bias_correct(magnitude: np.ndarray, sigma: float) -> np.ndarray:
    """``sqrt(max(M^2 - 2 sigma^2, 0))``: removes the noise floor of magnitude images.

    ``E[M^2] = A^2 + 2 sigma^2`` for a Rician magnitude M of true signal A (Gudbjartsson & Patz 1995),
    so this is the second-moment (power-image) correction; unbiased in ``A^2``, and it pulls the
    background down to about zero instead of ``sigma * sqrt(pi / 2)``.
    """
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    magnitude = np.asarray(magnitude, dtype=np.float64)
    return np.sqrt(np.clip(magnitude**2 - 2.0 * sigma**2, 0.0, None)).astype(np.float32)
