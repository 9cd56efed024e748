"""Tests for medsynth.data.phantoms: shapes, determinism, anatomy, contrast, lesions and errors."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.phantoms import (
    BRAIN_LABELS,
    CT_LABELS,
    PHANTOM_KINDS,
    Phantom,
    body_ct_phantom,
    brain_mri_phantom,
    generate_phantom,
)
from medsynth.errors import MedsynthError

SHAPES = [(48, 48), (32, 32, 24)]
LABELS = {"brain_mri": BRAIN_LABELS, "body_ct": CT_LABELS}
MODALITIES = {"brain_mri": "mr", "body_ct": "ct"}


def _label_means(phantom: Phantom, labels: dict[str, int]) -> dict[str, float]:
    """Mean image intensity of each label present in the phantom."""
    return {
        name: float(phantom.image[phantom.labels == value].mean())
        for name, value in labels.items()
        if np.any(phantom.labels == value)
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_shapes_dtypes_and_modality(kind: str, shape: tuple[int, ...]) -> None:
    phantom = generate_phantom(kind, shape, seed=0)
    assert phantom.image.shape == shape and phantom.labels.shape == shape
    assert phantom.image.dtype == np.float32
    assert phantom.labels.dtype == np.uint8
    assert np.all(np.isfinite(phantom.image))
    assert set(np.unique(phantom.labels)) <= set(LABELS[kind].values())
    assert phantom.class_label in (0, 1)
    assert phantom.modality == MODALITIES[kind]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_same_seed_is_identical_and_other_seeds_differ(kind: str, shape: tuple[int, ...]) -> None:
    first, again = generate_phantom(kind, shape, seed=7), generate_phantom(kind, shape, seed=7)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.labels.tobytes() == again.labels.tobytes()
    assert first.class_label == again.class_label
    other = generate_phantom(kind, shape, seed=8)
    assert not np.array_equal(first.labels, other.labels)
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_all_tissue_classes_are_present(kind: str, shape: tuple[int, ...]) -> None:
    for seed in range(3):
        present = set(np.unique(generate_phantom(kind, shape, seed=seed).labels).tolist())
        assert len(present) >= 4
        expected = set(LABELS[kind].values()) - {LABELS[kind]["lesion"]}
        assert expected <= present


@pytest.mark.parametrize("shape", SHAPES)
def test_brain_mri_contrast_is_t1_like(shape: tuple[int, ...]) -> None:
    for seed in range(4):
        phantom = generate_phantom("brain_mri", shape, seed=seed)
        mean = _label_means(phantom, BRAIN_LABELS)
        assert mean["scalp_fat"] > mean["white_matter"] > mean["gray_matter"] > mean["csf"]
        assert mean["csf"] > mean["skull"] > mean["background"]
        assert mean["background"] < 0.05 * mean["white_matter"]
        assert phantom.image.min() >= 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_body_ct_is_in_hounsfield_units(shape: tuple[int, ...]) -> None:
    for seed in range(4):
        mean = _label_means(generate_phantom("body_ct", shape, seed=seed), CT_LABELS)
        assert mean["bone"] > mean["liver"] > mean["soft_tissue"] > mean["fat"] > mean["air"]
        assert mean["air"] == pytest.approx(-1000.0, abs=30.0)
        assert mean["fat"] == pytest.approx(-100.0, abs=25.0)
        assert mean["liver"] == pytest.approx(60.0, abs=15.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_body_ct_is_wider_left_right_than_front_back(shape: tuple[int, ...]) -> None:
    body = generate_phantom("body_ct", shape, seed=0).labels != CT_LABELS["air"]
    extent = [np.ptp(np.nonzero(body)[axis]) / n for axis, n in enumerate(shape[:2])]
    assert extent[0] > 1.2 * extent[1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_class_label_says_whether_a_lesion_is_present(kind: str, shape: tuple[int, ...]) -> None:
    lesion = LABELS[kind]["lesion"]
    class_labels = []
    for seed in range(10):
        phantom = generate_phantom(kind, shape, seed=seed)
        assert phantom.class_label == int(np.any(phantom.labels == lesion))
        class_labels.append(phantom.class_label)
    assert set(class_labels) == {0, 1}
    for seed in range(3):
        assert generate_phantom(kind, shape, seed=seed, lesion_probability=0.0).class_label == 0
        assert generate_phantom(kind, shape, seed=seed, lesion_probability=1.0).class_label == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_lesion_changes_only_the_lesion(kind: str, shape: tuple[int, ...]) -> None:
    host = {"brain_mri": BRAIN_LABELS["white_matter"], "body_ct": CT_LABELS["liver"]}[kind]
    without = generate_phantom(kind, shape, seed=1, lesion_probability=0.0)
    with_lesion = generate_phantom(kind, shape, seed=1, lesion_probability=1.0)
    inside = with_lesion.labels == LABELS[kind]["lesion"]
    assert np.array_equal(without.labels[~inside], with_lesion.labels[~inside])
    # A lesion replaces its host organ only: white matter in the brain, liver in the abdomen.
    assert np.all(without.labels[inside] == host)


@pytest.mark.parametrize("shape", SHAPES)
def test_lesion_contrast(shape: tuple[int, ...]) -> None:
    brain = _label_means(generate_phantom("brain_mri", shape, seed=2, lesion_probability=1.0), BRAIN_LABELS)
    assert brain["lesion"] > brain["white_matter"]
    body = _label_means(generate_phantom("body_ct", shape, seed=2, lesion_probability=1.0), CT_LABELS)
    assert 0.0 < body["lesion"] < body["liver"] - 20.0


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_field_adds_smooth_variation_within_white_matter(shape: tuple[int, ...]) -> None:
    for seed in range(3):
        flat = generate_phantom("brain_mri", shape, seed=seed, bias_field=False)
        biased = generate_phantom("brain_mri", shape, seed=seed, bias_field=True)
        assert np.array_equal(flat.labels, biased.labels)
        white_matter = flat.labels == BRAIN_LABELS["white_matter"]
        assert biased.image[white_matter].std() > 1.2 * flat.image[white_matter].std()


def test_noise_level_is_an_option() -> None:
    rng_quiet, rng_noisy = np.random.default_rng(3), np.random.default_rng(3)
    quiet = body_ct_phantom((48, 48), rng_quiet, noise_std_hu=0.0)
    noisy = body_ct_phantom((48, 48), rng_noisy, noise_std_hu=20.0)
    liver = quiet.labels == CT_LABELS["liver"]
    assert quiet.image[liver].std() == pytest.approx(0.0, abs=1e-3)
    assert noisy.image[liver].std() == pytest.approx(20.0, rel=0.3)
    brain = brain_mri_phantom((48, 48), np.random.default_rng(3), bias_field=False, noise_std=0.0)
    white_matter = brain.labels == BRAIN_LABELS["white_matter"]
    assert brain.image[white_matter].std() == pytest.approx(0.0, abs=1e-3)


def test_generate_phantom_matches_the_direct_call() -> None:
    direct = brain_mri_phantom((48, 48), np.random.default_rng(5), lesion_probability=1.0)
    dispatched = generate_phantom("brain_mri", (48, 48), seed=5, lesion_probability=1.0)
    assert np.array_equal(direct.image, dispatched.image)
    assert np.array_equal(direct.labels, dispatched.labels)


# Seeded golden values: a change here means the generator changed, and every dataset built from it.
GOLDEN = {
    ("brain_mri", (48, 48)): (304.8174, [1099, 221, 197, 450, 155, 182, 0]),
    ("brain_mri", (32, 32, 24)): (181.4102, [17146, 1097, 1341, 2102, 1229, 1661, 0]),
    ("body_ct", (48, 48)): (-620.6736, [1437, 276, 406, 137, 26, 22, 0]),
    ("body_ct", (32, 32, 24)): (-617.8383, [15219, 2949, 5706, 411, 51, 240, 0]),
}


@pytest.mark.parametrize(("kind", "shape"), list(GOLDEN))
def test_golden_values_for_seed_0(kind: str, shape: tuple[int, ...]) -> None:
    image_mean, label_counts = GOLDEN[(kind, shape)]
    phantom = generate_phantom(kind, shape, seed=0)
    assert float(phantom.image.astype(np.float64).mean()) == pytest.approx(image_mean, abs=1e-3)
    assert np.bincount(phantom.labels.ravel(), minlength=7).tolist() == label_counts


def test_unknown_kind_names_the_allowed_kinds() -> None:
    with pytest.raises(MedsynthError, match="brain_mri, body_ct"):
        generate_phantom("chest_xray", (48, 48), seed=0)


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
@pytest.mark.parametrize(
    "shape", [(48,), (48, 48, 48, 48), (15, 48), (48, 0, 48), (48.0, 48), ("48", 48), (True, 48), 48]
)
def test_bad_shape_raises(kind: str, shape: object) -> None:
    with pytest.raises(MedsynthError, match="shape"):
        generate_phantom(kind, shape, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "options", "match"),
    [
        ("brain_mri", {"noise_std_hu": 5.0}, "noise_std_hu"),
        ("body_ct", {"bias_field": False}, "bias_field"),
        ("brain_mri", {"lesion_probability": 1.5}, "lesion_probability"),
        ("body_ct", {"noise_std_hu": -1.0}, "noise_std_hu"),
    ],
)
def test_bad_options_raise(kind: str, options: dict[str, object], match: str) -> None:
    with pytest.raises(MedsynthError, match=match):
        generate_phantom(kind, (48, 48), seed=0, **options)
