"""Noise models over arrays, 2D and 3D, seeded: Gaussian, Rician (magnitude MRI), low-dose CT.

Gaussian and Rician noise come from MONAI's ``RandGaussianNoise`` / ``RandRicianNoise`` with
``prob=1.0, sample_std=False`` (their defaults add noise one time in ten, at a random level).
Low-dose CT is simulated in the projection domain, which no kept library does: HU -> linear
attenuation -> parallel-beam forward projection (scikit-image ``radon``) -> Poisson photon counts at a
fraction of the full-dose flux plus electronic Gaussian noise -> log -> filtered back-projection
(``iradon``, ramp filter) -> HU. :func:`low_dose_ct_image_domain` is the cruder shortcut: white
Gaussian noise in HU whose level follows the dose as 1/sqrt(dose).
"""

from __future__ import annotations

import numpy as np
from monai.transforms import RandGaussianNoise, RandRicianNoise
from skimage.transform import iradon, radon

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at about 70 keV, 1/mm


def _check(image: np.ndarray, sigma: float | None = None) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("image has NaN/Inf values")
    if sigma is not None and not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise level must be a finite number >= 0, got {sigma}")
    return image


def gaussian_noise(image: np.ndarray, sigma: float, *, seed: int) -> np.ndarray:
    """``image + N(0, sigma^2)`` per voxel (MONAI ``RandGaussianNoise``)."""
    image = _check(image, sigma)
    transform = RandGaussianNoise(prob=1.0, mean=0.0, std=float(sigma), sample_std=False)
    transform.set_random_state(seed=seed)
    return np.asarray(transform(image), dtype=np.float32)


def rician_noise(image: np.ndarray, sigma: float, *, seed: int) -> np.ndarray:
    """Magnitude MRI noise ``sqrt((x + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, sigma^2)`` (MONAI ``RandRicianNoise``).

    ``sigma`` is absolute (in the image's units), not relative to the image's spread.
    """
    image = _check(image, sigma)
    transform = RandRicianNoise(
        prob=1.0, mean=0.0, std=float(sigma), relative=False, channel_wise=False, sample_std=False
    )
    transform.set_random_state(seed=seed)
    return np.asarray(transform(image), dtype=np.float32)


def _slices(volume: np.ndarray) -> list[np.ndarray]:
    # Axial slices: the last axis of a volume is the cranio-caudal one.
    return [volume] if volume.ndim == 2 else [volume[..., k] for k in range(volume.shape[-1])]


def _fbp_slice(
    hu: np.ndarray,
    *,
    dose_fraction: float,
    photons: float,
    electronic_std: float,
    spacing_mm: float,
    angles: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    side = max(hu.shape)
    padded = np.full((side, side), -1000.0, dtype=np.float64)
    padded[: hu.shape[0], : hu.shape[1]] = hu
    # 1. HU -> attenuation per pixel length (the line integrals come out dimensionless)
    mu = np.clip(MU_WATER_PER_MM * (1.0 + padded / 1000.0), 0.0, None) * spacing_mm
    sinogram = radon(mu, theta=angles, circle=False)
    # 2. photon counts at the reduced dose: Poisson (quantum) + Gaussian (electronic) noise
    incident = dose_fraction * photons
    counts = rng.poisson(incident * np.exp(-sinogram)).astype(np.float64)
    counts += rng.normal(0.0, electronic_std, size=counts.shape)
    noisy_sinogram = -np.log(np.clip(counts, 1.0, None) / incident)
    # 3. FBP of the noisy and of the clean sinogram; their difference is the noise alone, added to
    #    the input so that nothing but the noise changes (no reconstruction blur or streaks).
    size = side
    recon_noisy = iradon(noisy_sinogram, theta=angles, circle=False, filter_name="ramp", output_size=size)
    recon_clean = iradon(sinogram, theta=angles, circle=False, filter_name="ramp", output_size=size)
    noise_hu = 1000.0 * (recon_noisy - recon_clean) / (MU_WATER_PER_MM * spacing_mm)
    return (hu + noise_hu[: hu.shape[0], : hu.shape[1]]).astype(np.float32)


def low_dose_ct(
    hu: np.ndarray,
    *,
    dose_fraction: float,
    seed: int,
    spacing_mm: float = 1.0,
    photons: float = 1.0e5,
    electronic_std: float = 10.0,
    num_angles: int | None = None,
) -> np.ndarray:
    """Simulate a CT scan at ``dose_fraction`` of full dose in the projection domain (2D or slice-wise 3D).

    Args:
        hu: image in Hounsfield units, ``(X, Y)`` or ``(X, Y, Z)`` with Z the axial-slice axis.
        dose_fraction: k in (0, 1]: the incident flux is ``k * photons`` per detector ray.
        seed: noise seed.
        spacing_mm: in-plane pixel size (sets the path lengths, hence the attenuation).
        photons: full-dose incident photons per ray (typical clinical values are 1e5-1e6).
        electronic_std: standard deviation of the electronic noise, in photon counts.
        num_angles: projections over 180 degrees (default: the larger image side, rounded up to even).

    Returns:
        float32 HU image of the same shape.
    """
    hu = _check(hu)
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    if photons <= 0 or electronic_std < 0 or spacing_mm <= 0:
        raise ValueError("photons and spacing_mm must be > 0 and electronic_std >= 0")
    count = num_angles or int(2 * np.ceil(max(hu.shape[:2]) / 2))
    angles = np.linspace(0.0, 180.0, count, endpoint=False)
    rng = np.random.default_rng(seed)
    out = [
        _fbp_slice(
            s,
            dose_fraction=dose_fraction,
            photons=photons,
            electronic_std=electronic_std,
            spacing_mm=spacing_mm,
            angles=angles,
            rng=rng,
        )
        for s in _slices(hu)
    ]
    return out[0] if hu.ndim == 2 else np.stack(out, axis=-1)


def low_dose_ct_image_domain(
    hu: np.ndarray, *, dose_fraction: float, seed: int, full_dose_sigma_hu: float = 10.0
) -> np.ndarray:
    """The crude shortcut: white Gaussian noise of ``full_dose_sigma_hu * sqrt(1/k - 1)`` HU.

    Quantum noise variance scales as 1/dose, so going from full dose to ``k`` adds variance
    ``sigma_full^2 (1/k - 1)``. It ignores the noise texture (FBP noise is correlated, streaky and
    stronger behind dense objects); prefer :func:`low_dose_ct`.
    """
    hu = _check(hu)
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    return gaussian_noise(hu, full_dose_sigma_hu * float(np.sqrt(1.0 / dose_fraction - 1.0)), seed=seed)
