"""PSNR / SSIM over the whole image and inside a mask (MONAI), and the foreground contrast slope, 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio

from medsynth.data.phantoms import generate_phantom
from medsynth.data.transforms import foreground_mask
from medsynth.metrics.restoration import (
    contrast_slope,
    foreground,
    restoration_metrics,
    restoration_settings,
    ssim_kernel,
)

SHAPES = [pytest.param((40, 36), id="2d"), pytest.param((20, 18, 16), id="3d")]


def _reference(shape: tuple[int, ...]) -> np.ndarray:
    # Smooth structure plus texture, so that SSIM has something to compare.
    grids = np.meshgrid(*(np.linspace(0, 3, n) for n in shape), indexing="ij")
    texture = np.random.default_rng(0).random(shape)
    return (np.sin(sum(grids)) + 0.3 * texture).astype(np.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_identical_images_give_infinite_psnr_and_unit_ssim(shape: tuple[int, ...]) -> None:
    reference = _reference(shape)
    scores = restoration_metrics(reference, reference, data_range=2.6, mask=reference > 0)
    assert scores["psnr"] == np.inf and scores["psnr_fg"] == np.inf
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-6) and scores["ssim_fg"] == pytest.approx(1.0, abs=1e-6)
    assert set(restoration_metrics(reference, reference, data_range=2.6)) == {"psnr", "ssim"}
    assert set(scores) == {"psnr", "ssim", "psnr_fg", "ssim_fg", "slope_fg"}


@pytest.mark.parametrize("shape", SHAPES)
def test_known_squared_error_gives_the_exact_psnr(shape: tuple[int, ...]) -> None:
    reference = _reference(shape)
    mask = np.zeros(shape, dtype=bool)
    mask[: shape[0] // 2] = True  # half the image
    signs = np.where(np.indices(shape).sum(axis=0) % 2 == 0, 1.0, -1.0)
    error = np.where(mask, 0.05, 0.2) * signs  # |error| 0.05 inside the mask, 0.2 outside
    scores = restoration_metrics(reference + error, reference, data_range=2.0, mask=mask)
    mse = (0.05**2 + 0.2**2) / 2
    assert scores["psnr"] == pytest.approx(10 * np.log10(4.0 / mse), abs=1e-9)
    assert scores["psnr_fg"] == pytest.approx(10 * np.log10(4.0 / 0.05**2), abs=1e-9)
    # The same as scikit-image with the same data range.
    assert scores["psnr"] == pytest.approx(
        peak_signal_noise_ratio(reference, reference + error, data_range=2.0), abs=1e-9
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_whole_image_ssim_is_the_mean_of_the_ssim_map_and_an_all_ones_mask_matches_it(shape: tuple[int, ...]) -> None:
    reference = _reference(shape)
    estimate = reference + 0.1 * np.random.default_rng(1).standard_normal(shape)
    scores = restoration_metrics(estimate, reference, data_range=2.6, mask=np.ones(shape, dtype=bool))
    unmasked = restoration_metrics(estimate, reference, data_range=2.6)  # MONAI's SSIMMetric
    k = ssim_kernel(shape)
    ssim_map, _ = compute_ssim_and_cs(
        torch.as_tensor(estimate)[None, None],
        torch.as_tensor(reference)[None, None],
        spatial_dims=len(shape),
        kernel_size=(k,) * len(shape),
        kernel_sigma=(1.5,) * len(shape),
        data_range=2.6,
    )
    # The map covers the valid (unpadded) region only.
    assert ssim_map.shape[2:] == tuple(n - k + 1 for n in shape)
    assert unmasked["ssim"] == pytest.approx(float(ssim_map.mean()), abs=1e-6)
    assert scores["ssim"] == pytest.approx(unmasked["ssim"], abs=1e-6) and scores["psnr"] == unmasked["psnr"]
    assert scores["ssim_fg"] == pytest.approx(scores["ssim"], abs=1e-6)
    assert scores["psnr_fg"] == pytest.approx(scores["psnr"], abs=1e-9)
    assert 0.0 < scores["ssim"] < 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_is_aligned_with_the_ssim_map(shape: tuple[int, ...]) -> None:
    # One corrupted voxel p changes the SSIM of the windows centred within k // 2 = 3 voxels of it.
    reference = _reference(shape)
    p = tuple(n // 2 for n in shape)
    estimate = reference.copy()
    estimate[p] += 1.0

    def ssim_fg_at(offset: int) -> float:
        mask = np.zeros(shape, dtype=bool)
        mask[(p[0] + offset, *p[1:])] = True
        return restoration_metrics(estimate, reference, data_range=2.6, mask=mask)["ssim_fg"]

    # A mask shifted by the crop (k // 2) would see the opposite of both.
    assert ssim_fg_at(-4) == pytest.approx(1.0, abs=1e-6)
    assert ssim_fg_at(3) < 1.0 - 1e-4
    assert ssim_fg_at(0) < ssim_fg_at(3)


@pytest.mark.parametrize("shape", SHAPES)
def test_more_noise_scores_lower(shape: tuple[int, ...]) -> None:
    reference = _reference(shape)
    noise = np.random.default_rng(2).standard_normal(shape)
    mask = reference > 0
    runs = [
        restoration_metrics(reference + level * noise, reference, data_range=2.6, mask=mask)
        for level in (0.02, 0.1, 0.3)
    ]
    for key in ("psnr", "ssim", "psnr_fg", "ssim_fg"):
        values = [run[key] for run in runs]
        assert values[0] > values[1] > values[2], key


# --- contrast slope --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_slope_of_an_affine_estimate_is_its_gain(shape: tuple[int, ...]) -> None:
    reference = _reference(shape)
    mask = reference > 0
    rng = np.random.default_rng(3)
    for _ in range(3):
        gain, offset = float(rng.uniform(0.2, 1.8)), float(rng.uniform(-2.0, 2.0))
        scores = restoration_metrics(gain * reference + offset, reference, data_range=2.6, mask=mask)
        assert scores["slope_fg"] == pytest.approx(gain, abs=1e-9)
    # A seeded noisy estimate: the same as an ordinary least-squares fit with intercept over the mask voxels.
    estimate = 0.7 * reference + 0.2 + 0.1 * rng.standard_normal(shape)
    expected = np.polyfit(reference[mask], estimate[mask], 1)[0]
    assert restoration_metrics(estimate, reference, data_range=2.6, mask=mask)["slope_fg"] == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_slope_of_identical_and_of_constant_images(shape: tuple[int, ...]) -> None:
    reference = _reference(shape)
    mask = reference > 0
    assert restoration_metrics(reference, reference, data_range=2.6, mask=mask)["slope_fg"] == pytest.approx(
        1.0, abs=1e-12
    )
    flat = np.full(shape, 0.4)
    assert restoration_metrics(flat, reference, data_range=2.6, mask=mask)["slope_fg"] == 0.0
    # No contrast in the reference's foreground: nothing to keep or lose.
    constant = np.where(mask, 0.5, reference)
    scores = restoration_metrics(reference, constant, data_range=2.6, mask=mask)
    assert np.isnan(scores["slope_fg"]) and np.isfinite(scores["psnr_fg"])
    assert np.isnan(contrast_slope(np.arange(4.0), np.full(4, 0.1)))


@pytest.mark.parametrize("shape", [pytest.param((48, 48), id="2d"), pytest.param((24, 24, 24), id="3d")])
def test_smoothing_compresses_the_contrast(shape: tuple[int, ...]) -> None:
    clean = generate_phantom("brain_mri", shape, 0, noise_std=0.0).image.astype(np.float64)
    mask = foreground(clean, "mr")
    data_range = float(clean.max() - clean.min())
    noisy = clean + 0.05 * float(clean.max()) * np.random.default_rng(4).standard_normal(shape)
    slopes = [
        restoration_metrics(gaussian_filter(noisy, s), clean, data_range=data_range, mask=mask)["slope_fg"]
        for s in (0.0, 0.5, 1.0)
    ]
    # Additive noise independent of the image leaves the slope at about 1; blurring pulls it down
    # (measured: 2D 1.00 / 0.78 / 0.39, 3D 1.00 / 0.57 / 0.05; the small phantoms' structures are a few voxels wide).
    assert slopes[0] == pytest.approx(1.0, abs=0.05)
    assert slopes[0] > slopes[1] + 0.1 > slopes[2] + 0.2 and slopes[1] < 0.9


def test_channel_first_input_and_a_mask_only_at_the_border() -> None:
    reference = np.stack([_reference((32, 32)), _reference((32, 32)) * 0.5])
    estimate = reference + 0.05
    mask = np.zeros(reference.shape, dtype=bool)
    mask[:, 0, :] = True  # the first row: no SSIM window is centred there
    scores = restoration_metrics(estimate, reference, data_range=2.6, mask=mask, spatial_dims=2)
    assert scores["psnr_fg"] == pytest.approx(10 * np.log10(2.6**2 / 0.05**2), abs=1e-6)
    assert np.isnan(scores["ssim_fg"])


def test_kernel_size_and_settings() -> None:
    assert ssim_kernel((64, 64)) == 7 and ssim_kernel((14, 200)) == 7
    assert ssim_kernel((13, 13)) == 5 and ssim_kernel((10, 10)) == 5 and ssim_kernel((16, 16, 8)) == 3
    assert ssim_kernel((3, 3)) == 1
    settings = restoration_settings((16, 16, 8), 2000.0)
    assert settings["ssim_kernel_size"] == 3 and settings["data_range"] == 2000.0 and settings["spatial_dims"] == 3


def test_foreground_masks() -> None:
    mr = generate_phantom("brain_mri", (64, 64), 0).image
    np.testing.assert_array_equal(foreground(mr, "mr"), foreground_mask(mr))
    ct = generate_phantom("body_ct", (64, 64), 0).image
    body = foreground(ct, "ct")
    assert body.dtype == bool and not body[0, 0] and body[32, 32]
    with pytest.raises(ValueError, match="modality"):
        foreground(ct, "pet")


def test_bad_inputs_are_rejected() -> None:
    a = np.zeros((16, 16))
    with pytest.raises(ValueError, match="shapes differ"):
        restoration_metrics(a, np.zeros((16, 15)), data_range=1.0)
    with pytest.raises(ValueError, match="NaN"):
        restoration_metrics(np.full((16, 16), np.nan), a, data_range=1.0)
    for data_range in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="data_range"):
            restoration_metrics(a, a, data_range=data_range)
    for mask in (np.ones((16, 16), dtype=np.uint8), np.ones((16, 15), dtype=bool), np.zeros((16, 16), dtype=bool)):
        with pytest.raises(ValueError, match="mask"):
            restoration_metrics(a, a, data_range=1.0, mask=mask)
    with pytest.raises(ValueError, match="2D or 3D"):
        restoration_metrics(np.zeros(16), np.zeros(16), data_range=1.0)
