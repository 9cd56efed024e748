"""Tests for medsynth.training.utility and medsynth.metrics.utility: toy problems where the answer is known,
in 2D and 3D."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medsynth.errors import MedsynthError
from medsynth.metrics.utility import REGIMES, roc_auc, utility_figure, utility_metrics
from medsynth.training.utility import utility_experiment

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------
# toy data
# ---------------------------------------------------------------------------------------------------


def _distance(shape: tuple[int, ...], centre: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return np.sqrt(((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(0))


def blobs(n: int, shape: tuple[int, ...], *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 1: a bright blob somewhere on a dark noisy background; class 0: background only (half each)."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % 2
    rng.shuffle(classes)
    images = -0.8 + 0.1 * rng.standard_normal((n, 1, *shape))
    for i in np.flatnonzero(classes):
        images[i, 0][_distance(shape, rng.uniform(3, np.array(shape) - 4)) < 2.5] = 0.8
    return images.astype(np.float32), classes


def disks(n: int, shape: tuple[int, ...], *, seed: int, num_labels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Small bright disks/balls at random places and their label maps (label 1, or 1..num_labels-1 by case)."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, 1, *shape), dtype=np.int64)
    for i in range(n):
        maps[i, 0][_distance(shape, rng.uniform(3, np.array(shape) - 4)) < rng.uniform(2.0, 3.5)] = 1 + i % (
            num_labels - 1
        )
    images = np.where(maps > 0, 0.6, -0.7) + 0.1 * rng.standard_normal(maps.shape)
    return images.astype(np.float32), maps


def shuffled_classes(classes: np.ndarray) -> np.ndarray:
    """A permutation of the labels that is independent of the true class: half of each class flips."""
    out = classes.copy()
    for k in np.unique(classes):
        members = np.flatnonzero(classes == k)
        out[members[: len(members) // 2]] = 1 - k
    return out


def experiment(task: str, real, synthetic, test, **kwargs) -> dict:
    settings = {
        "spatial_dims": real[0].ndim - 2,
        "num_classes": 2,
        "ratio": 1.0,
        "seeds": (0, 1, 2),
        "steps": 30,
        **kwargs,
    }
    return utility_experiment(
        task,
        real_images=real[0],
        real_targets=real[1],
        synthetic_images=synthetic[0],
        synthetic_targets=synthetic[1],
        test_images=test[0],
        test_targets=test[1],
        **settings,
    )


def summary(result: dict) -> dict[str, str]:
    metric = result["metric"]
    return {r: f"{v['mean'][metric]:.3f} ± {v['std'][metric]:.3f}" for r, v in result["regimes"].items()}


# ---------------------------------------------------------------------------------------------------
# does it measure what the data teaches?
# ---------------------------------------------------------------------------------------------------


def test_classification_good_and_useless_synthetic_data() -> None:
    real, test = blobs(24, (16, 16), seed=0), blobs(40, (16, 16), seed=1)
    synthetic = blobs(24, (16, 16), seed=2)
    good = experiment("classification", real, synthetic, test)
    useless = experiment("classification", real, (synthetic[0], shuffled_classes(synthetic[1])), test)
    print("classification, good synthetic:", summary(good), "\nclassification, shuffled labels:", summary(useless))

    assert good["chance"]["accuracy"] == 0.5
    mean = {r: good["regimes"][r]["mean"] for r in REGIMES}
    assert mean["real"]["accuracy"] >= 0.85 and mean["real"]["balanced_accuracy"] >= 0.85 and mean["real"]["auc"] >= 0.9
    assert mean["real+synthetic"]["accuracy"] >= mean["real"]["accuracy"] - 0.1
    assert mean["synthetic"]["accuracy"] >= 0.85  # good synthetic data teaches the task on its own

    # labels independent of the images: the synthetic-only model learns nothing, the real-only one is unchanged
    assert useless["regimes"]["real"]["per_seed"] == good["regimes"]["real"]["per_seed"]
    assert useless["regimes"]["synthetic"]["mean"]["accuracy"] <= 0.7
    assert useless["regimes"]["synthetic"]["mean"]["balanced_accuracy"] <= 0.7
    assert useless["regimes"]["synthetic"]["mean"]["auc"] <= 0.75


def test_segmentation_good_and_mismatched_synthetic_maps() -> None:
    real, test = disks(16, (16, 16), seed=0), disks(24, (16, 16), seed=1)
    synthetic = disks(16, (16, 16), seed=2)
    good = experiment("segmentation", real, synthetic, test, steps=40)
    mismatched = experiment("segmentation", real, (synthetic[0], np.roll(synthetic[1], 1, axis=0)), test, steps=40)
    print("segmentation, good synthetic:", summary(good), "\nsegmentation, mismatched maps:", summary(mismatched))

    assert good["metric"] == "dice"
    assert good["regimes"]["real"]["mean"]["dice"] > 0.6
    assert good["regimes"]["synthetic"]["mean"]["dice"] > 0.6
    assert good["regimes"]["real+synthetic"]["mean"]["dice"] >= good["regimes"]["real"]["mean"]["dice"] - 0.1
    assert mismatched["regimes"]["synthetic"]["mean"]["dice"] < 0.4
    assert mismatched["regimes"]["synthetic"]["mean"]["dice"] < good["regimes"]["real"]["mean"]["dice"] - 0.3


# ---------------------------------------------------------------------------------------------------
# determinism, counts, result layout, reporting
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_results() -> dict[str, dict]:
    """Two identical calls per task (few steps, two seeds)."""
    data = {
        "classification": (blobs(8, (16, 16), seed=0), blobs(5, (16, 16), seed=1), blobs(8, (16, 16), seed=2)),
        "segmentation": (disks(8, (16, 16), seed=0), disks(5, (16, 16), seed=1), disks(8, (16, 16), seed=2)),
    }
    out = {}
    for task, (real, synthetic, test) in data.items():
        state = torch.get_rng_state()
        out[task] = [experiment(task, real, synthetic, test, seeds=(0, 1), steps=3, ratio=0.5) for _ in range(2)]
        assert torch.equal(torch.get_rng_state(), state), "the experiment must not move the caller's torch RNG"
    return out


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_deterministic(tiny_results: dict, task: str) -> None:
    first, second = tiny_results[task]
    assert first == second


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_result_layout_rows_and_metrics(tiny_results: dict, task: str) -> None:
    result = tiny_results[task][0]
    metric = {"classification": "accuracy", "segmentation": "dice"}[task]
    names = {"classification": {"accuracy", "balanced_accuracy", "auc"}, "segmentation": {"dice", "dice_label_1"}}[task]
    assert result["task"] == task and result["metric"] == metric
    assert tuple(result["regimes"]) == REGIMES
    counts = {r: (v["n_real"], v["n_synthetic"]) for r, v in result["regimes"].items()}
    assert counts == {
        "real": (8, 0),
        "real+synthetic": (8, 4),
        "synthetic": (0, 5),
    }  # round(0.5 * 8) = 4 of 5 synthetic
    for summary_ in result["regimes"].values():
        assert [run["seed"] for run in summary_["per_seed"]] == [0, 1]
        assert set(summary_["mean"]) == set(summary_["std"]) == names
        values = [run[metric] for run in summary_["per_seed"]]
        assert summary_["mean"][metric] == pytest.approx(np.mean(values))
        assert summary_["std"][metric] == pytest.approx(np.std(values, ddof=1))
        assert all(0.0 <= v <= 1.0 for v in values)
    settings = result["settings"]
    assert (
        settings["steps"] == 3
        and settings["seeds"] == [0, 1]
        and settings["batch_size"] == 16
        and settings["lr"] == 2e-3
    )
    assert settings["network"]["name"] and settings["network"]["parameters"] > 0

    assert len(result["rows"]) == len(REGIMES) * (2 + 2)
    assert [(row["regime"], row["seed"]) for row in result["rows"][:4]] == [
        ("real", 0),
        ("real", 1),
        ("real", "mean"),
        ("real", "std"),
    ]
    assert all(names <= set(row) and {"n_real", "n_synthetic"} <= set(row) for row in result["rows"])

    flat = utility_metrics(result)
    expected = {
        f"utility/{r}/{m}_{s}"
        for r in ("real", "real_plus_synthetic", "synthetic")
        for m in names
        for s in ("mean", "std")
    }
    expected |= {f"utility/gain/{m}" for m in names}
    assert set(flat) == expected
    assert flat[f"utility/gain/{metric}"] == pytest.approx(
        result["regimes"]["real+synthetic"]["mean"][metric] - result["regimes"]["real"]["mean"][metric]
    )
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    json.dumps(result, allow_nan=False)  # strict JSON: the pipeline writes it to utility.json


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_figure_is_written(tiny_results: dict, task: str, tmp_path) -> None:
    path = utility_figure(tiny_results[task][0], tmp_path / "figures" / "utility.png", title="toy")
    assert path == tmp_path / "figures" / "utility.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["utility.png"]  # no temporary file left behind


@pytest.mark.parametrize(
    "ratio, n_real, n_synthetic, expected", [(0.5, 6, 10, 3), (1.0, 6, 4, 4), (0.0, 6, 4, 0), (0.34, 6, 10, 2)]
)
def test_synthetic_count_in_real_plus_synthetic(ratio: float, n_real: int, n_synthetic: int, expected: int) -> None:
    real, test, synthetic = (
        blobs(n_real, (16, 16), seed=0),
        blobs(4, (16, 16), seed=1),
        blobs(n_synthetic, (16, 16), seed=2),
    )
    result = experiment("classification", real, synthetic, test, ratio=ratio, seeds=(0,), steps=1)
    assert result["regimes"]["real+synthetic"]["n_synthetic"] == expected
    assert result["regimes"]["real+synthetic"]["n_real"] == n_real
    assert result["regimes"]["synthetic"]["n_synthetic"] == n_synthetic
    # one seed: the mean is that seed's value, the std is undefined (None) and left out of the flat metrics
    assert result["regimes"]["real"]["std"]["accuracy"] is None
    assert result["regimes"]["real"]["mean"]["accuracy"] == result["regimes"]["real"]["per_seed"][0]["accuracy"]
    assert result == experiment("classification", real, synthetic, test, ratio=ratio, seeds=(0,), steps=1)
    assert not any(k.endswith("_std") for k in utility_metrics(result))


def test_unlabelled_cases_are_left_out() -> None:
    (images, classes), test, synthetic = (
        blobs(8, (16, 16), seed=0),
        blobs(4, (16, 16), seed=1),
        blobs(8, (16, 16), seed=2),
    )
    classes = classes.copy()
    classes[:2] = -1
    result = experiment(
        "classification", (images, classes), (synthetic[0], np.r_[-1, synthetic[1][1:]]), test, seeds=(0,), steps=1
    )
    assert result["regimes"]["real"]["n_real"] == 6
    assert result["regimes"]["real+synthetic"]["n_synthetic"] == 6  # round(1.0 * 6) of the 7 labelled synthetic cases
    assert result["regimes"]["synthetic"]["n_synthetic"] == 7


def test_label_absent_from_held_out_maps_is_none() -> None:
    real, synthetic = disks(4, (16, 16), seed=0, num_labels=3), disks(4, (16, 16), seed=1, num_labels=3)
    test = disks(3, (16, 16), seed=2, num_labels=2)  # label 2 never occurs in the held-out maps
    result = experiment("segmentation", real, synthetic, test, num_classes=3, seeds=(0, 1), steps=1)
    summary_ = result["regimes"]["real"]
    assert summary_["per_seed"][0]["dice_label_2"] is None and summary_["mean"]["dice_label_2"] is None
    assert summary_["mean"]["dice"] == pytest.approx(
        summary_["mean"]["dice_label_1"]
    )  # the mean is over the labels that occur
    assert not any("dice_label_2" in k for k in utility_metrics(result))
    json.dumps(result, allow_nan=False)


def test_roc_auc_rank_formula() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == pytest.approx(0.5)  # ties count half
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


# ---------------------------------------------------------------------------------------------------
# 3D smoke tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_3d_smoke(task: str) -> None:
    make = blobs if task == "classification" else (lambda n, shape, seed: disks(n, shape, seed=seed, num_labels=3))
    real, synthetic, test = make(4, (12, 12, 12), seed=0), make(4, (12, 12, 12), seed=1), make(4, (12, 12, 12), seed=2)
    num_classes = 2 if task == "classification" else 3
    lines: list[str] = []
    result = experiment(
        task, real, synthetic, test, num_classes=num_classes, seeds=(0, 1), steps=2, batch_size=4, progress=lines.append
    )
    assert len(lines) == len(REGIMES) * 2 and all(line.startswith(f"{task}, ") for line in lines)
    assert result["settings"]["image_shape"] == [1, 12, 12, 12] and result["settings"]["spatial_dims"] == 3
    names = (
        {"accuracy", "balanced_accuracy", "auc"}
        if task == "classification"
        else {"dice", "dice_label_1", "dice_label_2"}
    )
    for summary_ in result["regimes"].values():
        assert set(summary_["mean"]) == names and len(summary_["per_seed"]) == 2
    assert "utility/gain/" + result["metric"] in utility_metrics(result)


# ---------------------------------------------------------------------------------------------------
# errors: one clear line
# ---------------------------------------------------------------------------------------------------


def _cls_inputs(**changes) -> dict:
    (rx, ry), (sx, sy), (tx, ty) = blobs(6, (16, 16), seed=0), blobs(4, (16, 16), seed=1), blobs(4, (16, 16), seed=2)
    inputs = {
        "real_images": rx,
        "real_targets": ry,
        "synthetic_images": sx,
        "synthetic_targets": sy,
        "test_images": tx,
        "test_targets": ty,
        "spatial_dims": 2,
        "num_classes": 2,
        "ratio": 1.0,
        "steps": 1,
    }
    return {**inputs, **changes}


def _seg_inputs(**changes) -> dict:
    (rx, ry), (sx, sy), (tx, ty) = disks(4, (16, 16), seed=0), disks(4, (16, 16), seed=1), disks(4, (16, 16), seed=2)
    inputs = {
        "real_images": rx,
        "real_targets": ry,
        "synthetic_images": sx,
        "synthetic_targets": sy,
        "test_images": tx,
        "test_targets": ty,
        "spatial_dims": 2,
        "num_classes": 2,
        "ratio": 1.0,
        "steps": 1,
    }
    return {**inputs, **changes}


def _with_nan(images: np.ndarray) -> np.ndarray:
    images = images.copy()
    images[0, 0, 0, 0] = np.nan
    return images


ERRORS = [
    pytest.param("classification", _cls_inputs(seeds=()), "at least one seed", id="no-seeds"),
    pytest.param("classification", _cls_inputs(seeds=(1, 1)), "distinct", id="repeated-seed"),
    pytest.param(
        "classification",
        _cls_inputs(synthetic_images=np.zeros((0, 1, 16, 16), np.float32), synthetic_targets=np.zeros(0, int)),
        "synthetic_images is empty",
        id="empty-synthetic",
    ),
    pytest.param(
        "classification",
        _cls_inputs(real_targets=np.full(6, -1)),
        "real_targets has no labelled cases",
        id="no-labelled-real",
    ),
    pytest.param(
        "classification", _cls_inputs(real_targets=np.zeros(6, int)), "at least two classes", id="one-real-class"
    ),
    pytest.param(
        "classification",
        _cls_inputs(num_classes=1, real_targets=np.zeros(6, int)),
        "num_classes must be at least 2",
        id="one-class",
    ),
    pytest.param(
        "classification",
        _cls_inputs(test_targets=np.array([0, 1, 2, 0])),
        r"class 2; allowed: 0..1",
        id="class-out-of-range",
    ),
    pytest.param("classification", _cls_inputs(real_targets=np.zeros(5, int)), r"shape \(6,\)", id="targets-length"),
    pytest.param(
        "classification",
        _cls_inputs(synthetic_images=np.zeros((4, 1, 8, 8), np.float32)),
        r"synthetic_images have \(C, \*spatial\)",
        id="shape",
    ),
    pytest.param(
        "classification",
        _cls_inputs(test_images=np.zeros((4, 2, 16, 16), np.float32)),
        r"test_images have \(C, \*spatial\)",
        id="channels",
    ),
    pytest.param("classification", _cls_inputs(spatial_dims=3), "3 spatial axes", id="spatial-dims"),
    pytest.param(
        "classification",
        _cls_inputs(real_images=_with_nan(blobs(6, (16, 16), seed=0)[0])),
        "real_images contains NaN",
        id="nan",
    ),
    pytest.param("classification", _cls_inputs(ratio=-1.0), "ratio", id="negative-ratio"),
    pytest.param(
        "segmentation",
        _seg_inputs(real_targets=disks(4, (16, 16), seed=0, num_labels=3)[1]),
        r"label 2; allowed: 0..1",
        id="label-out-of-range",
    ),
    pytest.param(
        "segmentation",
        _seg_inputs(synthetic_targets=np.zeros((4, 1, 8, 8), int)),
        "label maps of shape",
        id="map-shape",
    ),
    pytest.param(
        "segmentation", _seg_inputs(real_targets=np.full((4, 1, 16, 16), 0.5)), "integer labels", id="float-labels"
    ),
    pytest.param(
        "segmentation",
        _seg_inputs(test_targets=np.zeros((4, 1, 16, 16), int)),
        "no foreground",
        id="no-test-foreground",
    ),
    pytest.param(
        "segmentation",
        _seg_inputs(**{k: v[..., :14] for k, v in _seg_inputs().items() if k.endswith(("images", "targets"))}),
        "divisible by 4",
        id="odd-size",
    ),
    pytest.param("detection", _cls_inputs(), "task must be one of", id="task"),
]


@pytest.mark.parametrize("task, inputs, message", ERRORS)
def test_errors(task: str, inputs: dict, message: str) -> None:
    with pytest.raises(MedsynthError, match=message) as error:
        utility_experiment(task, **inputs)
    assert "\n" not in str(error.value)
