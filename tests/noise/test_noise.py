"""Noise models (seeded, 2D/3D) and estimators recover known noise levels."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.phantoms import CT_LABELS, generate_phantom
from medsynth.noise.estimation import estimate_ct_sigma_hu, estimate_gaussian_sigma, estimate_rician_sigma
from medsynth.noise.models import gaussian_noise, low_dose_ct, low_dose_ct_image_domain, rician_noise

SHAPES = [(96, 96), (48, 48, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("model", [gaussian_noise, rician_noise])
def test_mri_noise_is_seeded_and_shaped(shape, model) -> None:
    image = np.full(shape, 100.0, dtype=np.float32)
    a, b, c = model(image, 5.0, seed=1), model(image, 5.0, seed=1), model(image, 5.0, seed=2)
    assert a.shape == shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rician_statistics() -> None:
    zeros = rician_noise(np.zeros((128, 128), np.float32), 10.0, seed=0)
    assert zeros.min() >= 0 and zeros.mean() == pytest.approx(10.0 * np.sqrt(np.pi / 2), rel=0.03)  # Rayleigh mean
    bright = rician_noise(np.full((128, 128), 500.0, np.float32), 10.0, seed=0)
    assert bright.std() == pytest.approx(10.0, rel=0.05)  # ~Gaussian at high SNR


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("fraction", [0.025, 0.05, 0.10])
def test_rician_sigma_from_background(shape, fraction) -> None:
    phantom = generate_phantom("brain_mri", shape, 3, noise_std=0.0, bias_field=False)
    sigma = fraction * np.percentile(phantom.image[phantom.labels > 0], 99)
    noisy = rician_noise(phantom.image, sigma, seed=4)
    # Without a mask: the air connected to the border (dark skull inside the head is not).
    assert estimate_rician_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    assert estimate_rician_sigma(noisy, background=phantom.labels == 0) == pytest.approx(sigma, rel=0.08)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_gaussian_sigma_wavelet(shape) -> None:
    phantom = generate_phantom("brain_mri", shape, 5, noise_std=0.0, bias_field=False)
    image = phantom.image / phantom.image.max()
    assert estimate_gaussian_sigma(gaussian_noise(image, 0.05, seed=0)) == pytest.approx(0.05, rel=0.2)


def test_ct_image_domain_shortcut_level() -> None:
    hu = generate_phantom("body_ct", (128, 128), 0, noise_std_hu=0.0).image
    noisy = low_dose_ct_image_domain(hu, dose_fraction=0.25, seed=0, full_dose_sigma_hu=10.0)
    assert (noisy - hu).std() == pytest.approx(10.0 * np.sqrt(3.0), rel=0.05)
    assert estimate_ct_sigma_hu(noisy) == pytest.approx(10.0 * np.sqrt(3.0), rel=0.15)


@pytest.mark.parametrize("shape", [(96, 96), (64, 64, 16)], ids=["2d", "3d"])
def test_low_dose_ct_projection_domain(shape) -> None:
    phantom = generate_phantom("body_ct", shape, 0, noise_std_hu=0.0)
    soft = phantom.labels == CT_LABELS["soft_tissue"]
    levels = {}
    for k in (1.0, 0.25, 0.1):
        noisy = low_dose_ct(phantom.image, dose_fraction=k, seed=1, spacing_mm=3.0)
        assert noisy.shape == shape and np.isfinite(noisy).all()
        levels[k] = (noisy - phantom.image)[soft].std()
        assert abs((noisy - phantom.image)[soft].mean()) < 0.2 * levels[k]  # unbiased in soft tissue
    # Quantum noise grows like 1/sqrt(dose) (more with electronic noise and photon starvation).
    assert levels[0.25] / levels[1.0] == pytest.approx(2.0, rel=0.25)
    assert levels[0.1] > levels[0.25] > levels[1.0]
    assert np.array_equal(
        low_dose_ct(phantom.image, dose_fraction=0.25, seed=1, spacing_mm=3.0),
        low_dose_ct(phantom.image, dose_fraction=0.25, seed=1, spacing_mm=3.0),
    )


def test_ct_sigma_estimate_sees_fbp_noise() -> None:
    phantom = generate_phantom("body_ct", (128, 128), 2, noise_std_hu=0.0)
    noisy = low_dose_ct(phantom.image, dose_fraction=0.25, seed=3, spacing_mm=2.5)
    truth = (noisy - phantom.image)[phantom.labels == CT_LABELS["soft_tissue"]].std()
    assert estimate_ct_sigma_hu(noisy) == pytest.approx(truth, rel=0.25)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4, 4)), np.array([[np.nan, 1.0], [1.0, 1.0]])])
def test_bad_images_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        gaussian_noise(bad, 1.0, seed=0)


def test_negative_sigma_and_dose_are_refused() -> None:
    with pytest.raises(ValueError):
        rician_noise(np.zeros((8, 8)), -1.0, seed=0)
    with pytest.raises(ValueError):
        low_dose_ct(np.zeros((16, 16)), dose_fraction=0.0, seed=0)
