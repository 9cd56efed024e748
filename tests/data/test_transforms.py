"""Intensity conventions invert exactly; model inputs have the configured size and spacing; split by case."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.config import DataConfig
from medsynth.data.prepare import safe_name, split_cases
from medsynth.data.transforms import Intensity, intensity_for, model_inputs
from medsynth.io.nifti import spacing_affine


def test_ct_window_round_trip_inside_window() -> None:
    hu = np.array([-1000.0, -100.0, 0.0, 40.0, 999.0])
    convention = Intensity("ct", -1000.0, 1000.0)
    normalised = np.asarray(convention.forward(hu))
    assert normalised.min() >= -1 and normalised.max() <= 1
    assert np.allclose(convention.inverse(normalised), hu, atol=1e-3)
    assert np.asarray(convention.forward(np.array([3000.0])))[0] == 1.0  # clipped, never wraps


def test_mr_foreground_percentile() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32), dtype=np.float32)
    image[8:24, 8:24] = rng.uniform(400, 800, (16, 16))
    convention = intensity_for(image, DataConfig(mr_percentile=99.0), "mr")
    foreground = image[image > 0]
    assert convention.high == pytest.approx(np.percentile(foreground, 99.0))
    normalised = np.asarray(convention.forward(image))
    assert normalised.min() == -1.0 and normalised.max() == 1.0
    inside = image < convention.high
    assert np.allclose(convention.inverse(normalised)[inside], image[inside], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("spatial_dims, size, expected_count", [(2, [16, 16], 10), (3, [16, 16, 8], 1)])
def test_model_inputs_2d_slices_and_3d_volume(spatial_dims: int, size: list[int], expected_count: int) -> None:
    volume = np.zeros((32, 32, 20), dtype=np.float32)
    volume[4:28, 4:28, :] = 500.0
    labels = (volume > 0).astype(np.uint8)
    data = DataConfig(
        spatial_dims=spatial_dims, image_size=size, slice_fraction=0.5, phantom={"shape": [16] * spatial_dims}
    )
    outputs = list(
        model_inputs(volume, spacing_affine((1.0, 1.0, 2.0), volume.shape), labels, data, Intensity("mr", 0.0, 500.0))
    )
    assert len(outputs) == expected_count
    image, label, _, spacing = outputs[0]
    assert image.shape == (1, *size) and label.shape == (1, *size) and set(np.unique(label)) <= {0, 1}
    expected_spacing = [2.0, 2.0] if spatial_dims == 2 else [2.0, 2.0, 5.0]
    assert np.allclose(spacing, expected_spacing)


def test_split_is_by_case_seeded_and_non_empty() -> None:
    train, val = split_cases(10, 0.2, seed=3)
    assert sorted(train + val) == list(range(10)) and len(val) == 2
    assert split_cases(10, 0.2, seed=3) == (train, val) and split_cases(10, 0.2, seed=4) != (train, val)
    assert len(split_cases(2, 0.01, seed=0)[1]) == 1


@pytest.mark.parametrize("text", ["../../etc/passwd", "/abs/path", "Doe^John 1970", "..", ""])
def test_safe_names_cannot_escape_the_output_folder(text: str) -> None:
    name = safe_name(text)
    assert "/" not in name and "\\" not in name and name not in ("", ".", "..") and not name.startswith(".")
