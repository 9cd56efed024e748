"""Tests for medsynth.metrics.memorisation, in 2D and 3D, on procedural multi-slice cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medsynth.metrics.memorisation import (
    AuditResult,
    audit_figure,
    image_distance_scale,
    memorisation_audit,
    nearest,
)

# (spatial shape, training cases, slices per case, fresh cases)
SETS = [pytest.param((20, 20), 12, 3, 20, id="2d"), pytest.param((12, 12, 12), 6, 2, 10, id="3d")]
THRESHOLD = 0.5
COPY_NOISE = 0.005


def cases(
    n_cases: int, slices: int, shape: tuple[int, ...], *, seed: int, step: float = 0.05
) -> tuple[np.ndarray, list[str]]:
    """``n_cases`` cases of ``slices`` near-identical scans each: images ``(n, 1, *shape)`` and group ids.

    A case is a smooth random texture plus three Gaussian blobs; its slices move the blobs by ``step``
    (on the [-1, 1] grid) along a random direction, ≈ 0.05 RMS apart, while cases are ≈ 0.4 RMS apart.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    d = len(shape)
    expand = (-1,) + (1,) * d
    images, groups = [], []
    for c in range(n_cases):
        centres = rng.uniform(-0.5, 0.5, size=(3, d))
        widths = rng.uniform(0.2, 0.4, size=3)
        amplitudes = rng.uniform(0.6, 1.4, size=3)
        texture = gaussian_filter(rng.normal(size=shape), 1.5)
        texture *= 0.25 / texture.std()
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        for k in range(slices):
            image = -0.5 + texture
            for centre, width, amplitude in zip(centres + step * k * direction, widths, amplitudes):
                image += amplitude * np.exp(-((grid - centre.reshape(expand)) ** 2).sum(0) / (2 * width**2))
            images.append(np.clip(image, -1, 1)[None])
            groups.append(f"case{seed}-{c}")
    return np.stack(images).astype(np.float32), groups


def copies_of(train: np.ndarray, *, seed: int = 5) -> np.ndarray:
    return train + np.random.default_rng(seed).normal(0, COPY_NOISE, train.shape).astype(np.float32)


def ratios(result: AuditResult, space: str = "image") -> np.ndarray:
    return np.array([scan[space]["ratio"] for scan in result.per_scan])


# --- copies and fresh draws -------------------------------------------------------------------------


@pytest.mark.parametrize("shape, n_cases, slices, n_fresh", SETS)
def test_copies_of_training_scans_are_flagged(shape, n_cases, slices, n_fresh):
    train, groups = cases(n_cases, slices, shape, seed=0)
    result = memorisation_audit(copies_of(train), train, groups, threshold=THRESHOLD)
    r = ratios(result)
    print(f"copies {len(shape)}D: ratio min {r.min():.4f} median {np.median(r):.4f} max {r.max():.4f}")
    assert result.spaces == ("image",)
    assert result.flagged() == list(range(len(train)))
    assert r.max() < 0.05  # measured ≈ 0.01 - 0.02: copy noise 0.005 RMS over ≈ 0.4 between cases
    for i, scan in enumerate(result.per_scan):
        assert scan["index"] == i
        assert scan["image"]["nearest"] == i
        assert scan["image"]["nearest_group"] == groups[i]
        assert scan["image"]["distance"] == pytest.approx(COPY_NOISE, rel=0.2)  # RMS per voxel
        assert scan["flagged_in"] == ["image"]


@pytest.mark.parametrize("shape, n_cases, slices, n_fresh", SETS)
def test_fresh_draws_are_not_flagged(shape, n_cases, slices, n_fresh):
    train, groups = cases(n_cases, slices, shape, seed=0)
    fresh, _ = cases(n_fresh, 1, shape, seed=1)
    result = memorisation_audit(fresh, train, groups, threshold=THRESHOLD)
    r = ratios(result)
    print(f"fresh {len(shape)}D: ratio min {r.min():.3f} median {np.median(r):.3f} max {r.max():.3f}")
    assert result.flagged() == []
    assert r.min() > THRESHOLD
    assert 0.8 < np.median(r) < 1.25  # a new case is about as far as real cases are from each other
    assert result.summary()["audit/image/median_ratio"] == pytest.approx(np.median(r))


def test_reference_distance_comes_from_another_group():
    shape = (20, 20)
    train, groups = cases(12, 3, shape, seed=0)
    fresh, _ = cases(20, 1, shape, seed=1)
    result = memorisation_audit(fresh, train, groups, threshold=THRESHOLD)
    scale = image_distance_scale(train)
    flat = train.reshape(len(train), -1).astype(np.float64)
    group_array = np.array(groups)
    for scan in result.per_scan:
        entry = scan["image"]
        j = entry["nearest"]
        assert entry["reference_group"] != entry["nearest_group"]
        others = np.flatnonzero(group_array != groups[j])
        brute = np.linalg.norm(flat[others] - flat[j], axis=1) / scale
        assert entry["reference"] == pytest.approx(brute.min(), rel=1e-9)
        assert entry["reference_nearest"] == others[np.argmin(brute)]

    # Without grouping, a neighbouring slice of the same case is the reference: r shrinks to the
    # slice spacing (≈ 0.05 RMS) and fresh cases read as far off the data (measured median ≈ 6.5).
    ungrouped = memorisation_audit(fresh, train, [str(i) for i in range(len(train))], threshold=THRESHOLD)
    grouped_median, ungrouped_median = np.median(ratios(result)), np.median(ratios(ungrouped))
    print(f"fresh 2D median ratio: grouped {grouped_median:.3f}, every slice its own group {ungrouped_median:.3f}")
    assert ungrouped_median > 3 * grouped_median
    assert ungrouped.summary()["audit/image/real_nn_median"] < 0.25 * result.summary()["audit/image/real_nn_median"]
    # ... and copies look several times less like copies
    copies = copies_of(train)
    assert np.median(
        ratios(memorisation_audit(copies, train, [str(i) for i in range(len(train))], threshold=THRESHOLD))
    ) > (3 * np.median(ratios(memorisation_audit(copies, train, groups, threshold=THRESHOLD))))


# --- feature space and the any / all rule ------------------------------------------------------------


def test_feature_space_and_rules():
    shape = (20, 20)
    train, groups = cases(8, 2, shape, seed=0)
    fresh, _ = cases(len(train), 1, shape, seed=1)
    rng = np.random.default_rng(7)
    train_features = rng.normal(size=(len(train), 6))
    copied_features = train_features + rng.normal(0, 1e-3, train_features.shape)
    fresh_features = rng.normal(size=(len(train), 6)) * 3.0 + 10.0  # far from every training feature

    # image space says copy, feature space does not
    kwargs = {"threshold": THRESHOLD, "synthetic_features": fresh_features, "train_features": train_features}
    any_rule = memorisation_audit(copies_of(train), train, groups, rule="any", **kwargs)
    all_rule = memorisation_audit(copies_of(train), train, groups, rule="all", **kwargs)
    assert any_rule.spaces == ("image", "feature")
    assert any_rule.flagged() == list(range(len(train)))
    assert all_rule.flagged() == []
    assert all(scan["flagged_in"] == ["image"] for scan in any_rule.per_scan + all_rule.per_scan)
    assert ratios(any_rule, "feature").min() > 1.0

    # the reverse: features copied, images new
    kwargs["synthetic_features"] = copied_features
    any_rule = memorisation_audit(fresh, train, groups, rule="any", **kwargs)
    all_rule = memorisation_audit(fresh, train, groups, rule="all", **kwargs)
    assert any_rule.flagged() == list(range(len(train)))
    assert all_rule.flagged() == []
    assert all(scan["flagged_in"] == ["feature"] for scan in any_rule.per_scan)
    assert [scan["feature"]["nearest"] for scan in any_rule.per_scan] == list(range(len(train)))
    # rule "image": feature space is measured and reported, only image space flags
    image_rule = memorisation_audit(fresh, train, groups, rule="image", **kwargs)
    assert image_rule.flagged() == [] and all(scan["flagged_in"] == ["feature"] for scan in image_rule.per_scan)
    image_rule = memorisation_audit(
        copies_of(train), train, groups, rule="image", **(kwargs | {"synthetic_features": fresh_features})
    )
    assert image_rule.flagged() == list(range(len(train)))

    # copies in both spaces: flagged under either rule
    both = memorisation_audit(copies_of(train), train, groups, rule="all", **kwargs)
    assert both.flagged() == list(range(len(train)))
    assert all(scan["flagged_in"] == ["image", "feature"] for scan in both.per_scan)
    summary = both.summary()
    assert summary["audit/feature/min_ratio"] < 0.05
    assert summary["audit/flagged_fraction"] == 1.0


# --- nearest: exclusion, chunking, precision ---------------------------------------------------------


def brute_nearest(queries, references, exclude):
    q = queries.reshape(len(queries), -1).astype(np.float64)
    r = references.reshape(len(references), -1).astype(np.float64)
    distances = np.linalg.norm(q[:, None] - r[None], axis=2)
    distances[exclude] = np.inf
    return distances.argmin(axis=1), distances.min(axis=1)


@pytest.mark.parametrize("chunk", [1, 2, 3, None])
def test_nearest_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(7, 1, 5, 4, 3)).astype(np.float32)
    references = rng.normal(size=(9, 1, 5, 4, 3)).astype(np.float32)
    query_groups = ["a", "b", "c", "a", "b", "c", "d"]
    reference_groups = ["a", "a", "b", "b", "c", "c", "d", "e", "e"]
    mask = rng.random((7, 9)) < 0.3
    mask[:, 7] = True
    group_mask = np.array(query_groups)[:, None] == np.array(reference_groups)[None, :]

    index, distance = nearest(queries, references, exclude=mask, chunk=chunk)
    expected_index, expected_distance = brute_nearest(queries, references, mask)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(distance, expected_distance, rtol=1e-12)

    index, distance = nearest(
        queries, references, exclude=mask, query_groups=query_groups, reference_groups=reference_groups, chunk=chunk
    )
    expected_index, expected_distance = brute_nearest(queries, references, mask | group_mask)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(distance, expected_distance, rtol=1e-12)


def test_nearest_ties_and_precision():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 1.0, size=(3, 4096))
    references = np.concatenate([base, base])  # every reference twice: the lower index wins
    index, _ = nearest(base, references, chunk=2)
    np.testing.assert_array_equal(index, [0, 1, 2])
    # a near-copy 1e-9 per value away: |q|² - 2 q·r + |r|² cancels to noise, the direct recompute does not
    queries = base + 1e-9
    _, distance = nearest(queries, base)
    np.testing.assert_allclose(distance, np.linalg.norm(queries - base, axis=1), rtol=1e-6)


def test_nearest_errors():
    a = np.zeros((2, 1, 4, 4))
    with pytest.raises(ValueError, match="values per row"):
        nearest(a, np.zeros((2, 1, 4, 5)))
    with pytest.raises(ValueError, match="no allowed reference"):
        nearest(a, a, exclude=np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        nearest(a, a, exclude=np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="together"):
        nearest(a, a, query_groups=["x", "y"])
    with pytest.raises(ValueError, match="chunk"):
        nearest(a, a, chunk=0)


def test_audit_3d_chunked_equals_unchunked():
    shape = (12, 12, 12)
    train, groups = cases(5, 2, shape, seed=3)
    synthetic = np.concatenate([copies_of(train[:3]), cases(4, 1, shape, seed=4)[0]])
    features = np.random.default_rng(0).normal(size=(len(train) + len(synthetic), 5))
    kwargs = {"threshold": 0.3, "train_features": features[: len(train)], "synthetic_features": features[len(train) :]}
    whole = memorisation_audit(synthetic, train, groups, chunk=10_000, **kwargs)
    for chunk in (1, 3):
        chunked = memorisation_audit(synthetic, train, groups, chunk=chunk, **kwargs)
        assert chunked.flagged() == whole.flagged() == [0, 1, 2]
        for a, b in zip(chunked.per_scan, whole.per_scan):
            for space in ("image", "feature"):
                for key in ("nearest", "reference_nearest", "nearest_group", "reference_group"):
                    assert a[space][key] == b[space][key]
                for key in ("distance", "reference", "ratio"):
                    assert a[space][key] == pytest.approx(b[space][key], rel=1e-12)


# --- units, errors, output ---------------------------------------------------------------------------


def test_image_distance_is_rms_per_voxel():
    assert image_distance_scale(np.zeros((3, 2, 4, 5, 6))) == pytest.approx(math.sqrt(2 * 4 * 5 * 6))
    train = np.stack([np.full((1, 8, 8), -0.5), np.full((1, 8, 8), 0.5)])
    result = memorisation_audit(train[:1] + 0.1, train, ["p1", "p2"], threshold=0.3)
    entry = result.per_scan[0]["image"]
    assert entry["distance"] == pytest.approx(0.1)  # a uniform 0.1 offset is 0.1 RMS
    assert entry["reference"] == pytest.approx(1.0)
    assert entry["ratio"] == pytest.approx(0.1)


def _error_cases():
    train, groups = cases(3, 2, (8, 8), seed=0)
    nan = train.copy()
    nan[0, 0, 0, 0] = np.nan
    inf = train.copy()
    inf[1, 0, 2, 2] = np.inf
    features = np.zeros((len(train), 4))
    return [
        pytest.param(dict(synthetic=train[:, :, :6]), "differ in shape", id="shape"),
        pytest.param(dict(synthetic=train[:, 0]), "must have shape", id="rank"),
        pytest.param(dict(synthetic=nan), "synthetic contains NaN", id="nan"),
        pytest.param(dict(train=inf), "train contains NaN", id="inf"),
        pytest.param(dict(train_groups=["one"] * len(train)), "at least 2 distinct groups", id="one-group"),
        pytest.param(dict(train_groups=groups[:-1]), "one entry per scan", id="group-count"),
        pytest.param(dict(synthetic_features=features), "given together", id="features-one-set"),
        pytest.param(dict(train_features=features), "given together", id="features-other-set"),
        pytest.param(
            dict(synthetic_features=features[:-1], train_features=features), "one row per synthetic", id="feature-rows"
        ),
        pytest.param(
            dict(synthetic_features=features, train_features=features[:, :3]), "differ in width", id="feature-width"
        ),
        pytest.param(
            dict(synthetic_features=features, train_features=np.full_like(features, np.nan)),
            "train_features contains NaN",
            id="feature-nan",
        ),
        pytest.param(dict(threshold=0.0), "threshold must be", id="threshold-zero"),
        pytest.param(dict(threshold=-1.0), "threshold must be", id="threshold-negative"),
        pytest.param(dict(threshold=float("nan")), "threshold must be", id="threshold-nan"),
        pytest.param(dict(rule="most"), "rule must be one of", id="rule"),
    ], (train, groups)


ERROR_CASES, ERROR_DATA = _error_cases()


@pytest.mark.parametrize("override, message", ERROR_CASES)
def test_audit_errors(override, message):
    train, groups = ERROR_DATA
    kwargs = {"synthetic": train, "train": train, "train_groups": groups, "threshold": 0.3, **override}
    with pytest.raises(ValueError, match=message):
        memorisation_audit(kwargs.pop("synthetic"), kwargs.pop("train"), kwargs.pop("train_groups"), **kwargs)


@pytest.mark.parametrize("shape, n_cases, slices, n_fresh", SETS)
def test_figure_is_written(tmp_path, shape, n_cases, slices, n_fresh):
    train, groups = cases(n_cases, slices, shape, seed=0)
    synthetic = np.concatenate([copies_of(train[:2]), cases(n_fresh, 1, shape, seed=1)[0]])
    result = memorisation_audit(synthetic, train, groups, threshold=THRESHOLD)
    path = audit_figure(result, synthetic, train, tmp_path / "audit" / "pairs.png", top=6)
    assert path == tmp_path / "audit" / "pairs.png"
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError, match="audited spaces"):
        audit_figure(result, synthetic, train, tmp_path / "f.png", space="feature")
    with pytest.raises(ValueError, match="audit covers"):
        audit_figure(result, synthetic[:-1], train, tmp_path / "f.png")


def test_json_and_summary():
    train, groups = cases(4, 2, (8, 8), seed=0)
    features = np.random.default_rng(0).normal(size=(len(train), 3))
    result = memorisation_audit(
        copies_of(train), train, groups, threshold=0.3, synthetic_features=features, train_features=features
    )
    summary = result.summary()
    for space in ("image", "feature"):
        for key in ("min_ratio", "median_ratio", "real_nn_median"):
            assert f"audit/{space}/{key}" in summary
    assert {"audit/flagged", "audit/flagged_fraction"} <= set(summary)
    assert all(type(value) is float for value in summary.values())
    encoded = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert encoded["spaces"] == ["image", "feature"]
    assert encoded["flagged"] == list(range(len(train)))
    assert encoded["per_scan"][0]["image"]["nearest"] == 0
    assert type(encoded["per_scan"][0]["flagged"]) is bool


def test_duplicated_real_scans_give_zero_reference():
    # two patients with the very same scan: r = 0, so an exact copy has ratio 0 and anything else inf
    scan = np.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    train = np.concatenate([scan, scan, -scan])
    result = memorisation_audit(np.concatenate([scan, scan * 0.9]), train, ["p1", "p2", "p3"], threshold=0.3)
    assert [s["image"]["ratio"] for s in result.per_scan] == [0.0, math.inf]
    assert result.flagged() == [0]
    encoded = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert encoded["per_scan"][1]["image"]["ratio"] is None
