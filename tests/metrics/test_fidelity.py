"""Tests for medsynth.metrics.fidelity, in 2D and 3D."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

from medsynth.metrics.fidelity import (
    MS_SSIM_WEIGHTS,
    class_intensity_distance,
    evaluate_fidelity,
    mmd,
    pairwise_ms_ssim,
    ssim_settings,
)

SHAPES = [pytest.param(2, (32, 32), id="2d"), pytest.param(3, (16, 16, 16), id="3d")]
# label value -> intensity of a three-class phantom: background, "tissue" disc, "lesion" core
CLASS_INTENSITY = {0: -0.9, 1: 0.0, 2: 0.6}
CLASS_NAMES = {0: "background", 1: "tissue", 2: "lesion"}


def phantoms(n: int, shape: tuple[int, ...], *, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Discs/balls with an off-centre core, random sizes and positions: images (n,1,*shape) and labels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    labels = np.zeros((n, 1, *shape), dtype=np.int64)
    for i in range(n):
        centre = rng.uniform(-0.2, 0.2, size=len(shape))
        radius = rng.uniform(0.5, 0.75)
        dist = np.sqrt(((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(0))
        labels[i, 0][dist < radius] = 1
        core = centre + rng.uniform(-0.2, 0.2, size=len(shape))
        core_dist = np.sqrt(((grid - core.reshape(-1, *[1] * len(shape))) ** 2).sum(0))
        labels[i, 0][core_dist < radius * rng.uniform(0.3, 0.45)] = 2
    images = np.vectorize(CLASS_INTENSITY.get)(labels).astype(np.float32)
    images += rng.normal(0.0, noise, size=images.shape).astype(np.float32)
    return torch.from_numpy(images.clip(-1, 1)), torch.from_numpy(labels)


def uniform_noise(n: int, shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-1, 1, size=(n, 1, *shape)).astype(np.float32))


# --- mmd ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_mmd_identical_sets_near_zero(spatial_dims: int, shape: tuple[int, ...]) -> None:
    images, _ = phantoms(8, shape, seed=0)
    value = mmd(images, images)
    # The unbiased estimate on the very same set is -2/m times the mean per-voxel variance.
    expected = -2.0 / 8 * images.double().var(dim=0).mean().item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert abs(value) < 0.05
    # ... and exactly 0 when all images are equal.
    same = images[:1].repeat(4, 1, *[1] * spatial_dims)
    assert mmd(same, same) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_mmd_grows_with_shift(spatial_dims: int, shape: tuple[int, ...]) -> None:
    real, _ = phantoms(8, shape, seed=0)
    fake, _ = phantoms(8, shape, seed=1)
    values = [mmd(real, fake + shift) for shift in (0.0, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert abs(values[0]) < 0.05
    assert values[-1] > values[0] + 0.1  # a 0.4 shift adds 0.16 per voxel
    assert mmd(real, 0.5 * fake) > values[0] + 0.01


def test_mmd_unequal_set_sizes() -> None:
    real, _ = phantoms(6, (32, 32), seed=0)
    fake, _ = phantoms(16, (32, 32), seed=1)
    assert mmd(real, fake) == pytest.approx(mmd(fake, real))
    assert abs(mmd(real, fake)) < 0.05
    assert mmd(real, fake + 0.3) > mmd(real, fake) + 0.05
    with pytest.raises(ValueError, match="at least 2"):
        mmd(real[:1], fake)


# --- ssim_settings / pairwise_ms_ssim -------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial_dims, side",
    [(2, 32), (2, 64), (2, 200), (3, 32), (3, 64)],
)
def test_ssim_settings_fit_monai(spatial_dims: int, side: int) -> None:
    shape = (side,) * spatial_dims
    settings = ssim_settings(shape)
    assert settings["metric"] == "ms_ssim"
    assert len(settings["weights"]) == settings["scales"]
    assert sum(settings["weights"]) == pytest.approx(1.0, abs=1e-3)
    metric = MultiScaleSSIMMetric(
        spatial_dims=spatial_dims,
        data_range=2.0,
        kernel_type=settings["kernel_type"],
        kernel_size=settings["kernel_size"],
        kernel_sigma=settings["kernel_sigma"],
        weights=settings["weights"],
    )
    images = uniform_noise(2, shape, seed=0)
    value = metric(y_pred=images[:1], y=images[1:])  # raises if the settings do not fit
    assert 0.0 <= float(value) <= 1.0
    if side == 200:
        assert settings["scales"] == 5 and settings["kernel_size"] == 11
        assert settings["weights"] == MS_SSIM_WEIGHTS
    if side == 32:
        assert (settings["scales"], settings["kernel_size"]) == (3, 7)
    if side == 64:
        assert (settings["scales"], settings["kernel_size"]) == (4, 7)


def test_ssim_settings_fall_back_to_single_scale() -> None:
    settings = ssim_settings((12, 12))
    assert settings["metric"] == "ssim" and settings["scales"] == 1
    metric = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=settings["kernel_size"])
    images = uniform_noise(2, (12, 12), seed=0)
    assert math.isfinite(float(metric(y_pred=images[:1], y=images[1:])))
    assert pairwise_ms_ssim(images, spatial_dims=2) < 0.5
    with pytest.raises(ValueError, match="too small"):
        ssim_settings((2, 16))


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_pairwise_ms_ssim_orders_diversity(spatial_dims: int, shape: tuple[int, ...]) -> None:
    blobs, _ = phantoms(6, shape, seed=0)
    identical = blobs[:1].repeat(6, 1, *[1] * spatial_dims)
    same = pairwise_ms_ssim(identical, spatial_dims=spatial_dims)
    varied = pairwise_ms_ssim(blobs, spatial_dims=spatial_dims)
    noise = pairwise_ms_ssim(uniform_noise(6, shape, seed=0), spatial_dims=spatial_dims)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert noise < 0.2
    assert noise + 0.1 < varied < same - 0.05


def test_pairwise_ms_ssim_seeded_subset() -> None:
    blobs, _ = phantoms(12, (32, 32), seed=0)  # 66 pairs
    first = pairwise_ms_ssim(blobs, spatial_dims=2, max_pairs=10, seed=3)
    assert pairwise_ms_ssim(blobs, spatial_dims=2, max_pairs=10, seed=3) == first
    assert pairwise_ms_ssim(blobs, spatial_dims=2, max_pairs=10, seed=4) != first
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_ms_ssim(blobs[:1], spatial_dims=2)


GOLDEN_MS_SSIM = 0.512374  # computed once with monai 1.6.1, torch 2.13 CPU


def test_pairwise_ms_ssim_golden_value() -> None:
    blobs, _ = phantoms(5, (32, 32), seed=42)
    assert pairwise_ms_ssim(blobs, spatial_dims=2) == pytest.approx(GOLDEN_MS_SSIM, abs=1e-5)


# --- class_intensity_distance -------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_class_distance_same_distribution_small(spatial_dims: int, shape: tuple[int, ...]) -> None:
    real, labels = phantoms(8, shape, seed=0)
    identical = class_intensity_distance(real, labels, real.clone(), class_names=CLASS_NAMES)
    assert set(identical) == {
        *(f"hist_w1/{n}" for n in CLASS_NAMES.values()),
        *(f"fraction_diff/{n}" for n in CLASS_NAMES.values()),
        "hist_w1/all",
        "hist_w1/mean_class",
    }
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in identical.values())

    fake, _ = phantoms(8, shape, seed=1)
    resampled = class_intensity_distance(real, labels, fake, class_names=CLASS_NAMES)
    assert all(math.isfinite(v) for v in resampled.values())
    assert max(resampled[f"hist_w1/{n}"] for n in CLASS_NAMES.values()) < 0.02
    # the whole-image distance also carries the sampling spread of the class fractions
    assert resampled["hist_w1/all"] < 0.05
    assert max(v for k, v in resampled.items() if k.startswith("fraction_diff/")) < 0.1


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_class_distance_flags_the_shifted_class(spatial_dims: int, shape: tuple[int, ...]) -> None:
    real, labels = phantoms(8, shape, seed=0)
    fake, fake_labels = phantoms(8, shape, seed=1)
    base = class_intensity_distance(real, labels, fake, class_names=CLASS_NAMES)
    shifted = class_intensity_distance(real, labels, fake + 0.1 * (fake_labels == 1), class_names=CLASS_NAMES)
    increase = {n: shifted[f"hist_w1/{n}"] - base[f"hist_w1/{n}"] for n in CLASS_NAMES.values()}
    assert max(increase, key=increase.get) == "tissue"
    assert increase["tissue"] > 0.05
    assert shifted["hist_w1/all"] > base["hist_w1/all"]


def test_class_distance_missing_class_in_fake() -> None:
    real, labels = phantoms(8, (32, 32), seed=0)
    fake, fake_labels = phantoms(8, (32, 32), seed=1)
    # the lesion core painted over with tissue intensity
    no_lesion = torch.where(fake_labels == 2, fake - CLASS_INTENSITY[2] + CLASS_INTENSITY[1], fake)
    base = class_intensity_distance(real, labels, fake)
    missing = class_intensity_distance(real, labels, no_lesion)
    lesion_fraction = (labels == 2).double().mean().item()
    assert missing["fraction_diff/class_2"] == pytest.approx(lesion_fraction, rel=0.1)
    assert missing["fraction_diff/class_2"] > base["fraction_diff/class_2"] + 0.02
    assert missing["fraction_diff/class_1"] > base["fraction_diff/class_1"] + 0.02
    assert math.isnan(missing["hist_w1/class_2"])  # no synthetic voxel is lesion-like
    assert math.isfinite(missing["hist_w1/mean_class"])


def test_class_distance_rejects_bad_labels() -> None:
    real, labels = phantoms(4, (16, 16), seed=0)
    with pytest.raises(ValueError, match="shape of real"):
        class_intensity_distance(real, labels[:, :, :8], real)
    with pytest.raises(ValueError, match="integer"):
        class_intensity_distance(real, labels.float() + 0.5, real)
    with pytest.raises(ValueError, match="single-channel"):
        class_intensity_distance(real.repeat(1, 2, 1, 1), labels.repeat(1, 2, 1, 1), real.repeat(1, 2, 1, 1))


# --- evaluate_fidelity ---------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_evaluate_fidelity_finite(spatial_dims: int, shape: tuple[int, ...]) -> None:
    real, labels = phantoms(8, shape, seed=0)
    fake, _ = phantoms(8, shape, seed=1)
    result = evaluate_fidelity(real, fake, spatial_dims=spatial_dims, real_labels=labels, class_names=CLASS_NAMES)
    for key in ("mmd", "diversity_ms_ssim/fake", "diversity_ms_ssim/real", "diversity_gap", "hist_w1/tissue"):
        assert key in result
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())
    assert result["diversity_gap"] == pytest.approx(
        abs(result["diversity_ms_ssim/fake"] - result["diversity_ms_ssim/real"])
    )
    assert set(evaluate_fidelity(real[:3], fake[:3], spatial_dims=spatial_dims)) == {
        "mmd",
        "diversity_ms_ssim/fake",
        "diversity_ms_ssim/real",
        "diversity_gap",
    }


@pytest.mark.parametrize("spatial_dims, shape", SHAPES)
def test_evaluate_fidelity_rejects_bad_input(spatial_dims: int, shape: tuple[int, ...]) -> None:
    real, _ = phantoms(4, shape, seed=0)
    fake = real.clone()
    fake[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate_fidelity(real, fake, spatial_dims=spatial_dims)
    with pytest.raises(ValueError, match="channel"):
        evaluate_fidelity(real, real.repeat(1, 2, *[1] * spatial_dims), spatial_dims=spatial_dims)
    smaller = real[..., : shape[-1] // 2]
    with pytest.raises(ValueError, match="spatial shapes"):
        evaluate_fidelity(real, smaller, spatial_dims=spatial_dims)
    with pytest.raises(ValueError, match="shape"):
        evaluate_fidelity(real, real, spatial_dims=5 - spatial_dims)
