"""The small evaluation trainers on the one training loop (feature network, classifier, segmenter), 2D and
3D: the functions are deterministic, keep nothing by default and resume through a work folder. Their exact
resume is part of the one resume test over every trainer (tests/training/test_engine.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Interrupt

from medsynth.io.state import load_state
from medsynth.training.classifier import ClassifierTrainer, train_classifier
from medsynth.training.engine import RunSettings, Trainer
from medsynth.training.feature_network import FeatureNetworkTrainer, train_feature_network
from medsynth.training.utility import SegmenterTrainer, train_segmenter

torch.set_num_threads(1)

KINDS = ("feature_network", "classifier", "segmenter")
STEPS, INTERRUPT_AT, SEED = 5, 2, 3
# Six items in batches of four: steps cross epoch boundaries. Non-square sides (divisible by 4, for the
# UNet) make the feature network crop its slices square.
SHAPES = {2: (12, 16), 3: (8, 8, 12)}


def data(dims: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 1, *SHAPES[dims])).astype(np.float32)
    return {"images": images, "classes": np.array([0, 1, 0, 1, -1, 1]), "maps": (images > 0.3).astype(np.int64)}


def trainer_for(kind: str, dims: int, run: RunSettings) -> Trainer:
    d = data(dims)
    common: dict[str, Any] = {"spatial_dims": dims, "steps": STEPS, "batch_size": 4, "lr": 2e-3, "run": run}
    if kind == "feature_network":
        return FeatureNetworkTrainer(d["images"], d["classes"], width=4, **common)
    if kind == "classifier":
        return ClassifierTrainer(d["images"], d["classes"], num_classes=2, **common)
    return SegmenterTrainer(d["images"], d["maps"], num_labels=2, **common)


def trained_network(kind: str, dims: int, *, seed: int = SEED, run: RunSettings | None = None) -> torch.nn.Module:
    d = data(dims)
    common: dict[str, Any] = {"spatial_dims": dims, "steps": STEPS, "batch_size": 4, "seed": seed, "run": run}
    if kind == "feature_network":
        return train_feature_network(d["images"], d["classes"], width=4, **common).network
    if kind == "classifier":
        return train_classifier(d["images"], d["classes"], num_classes=2, **common).network
    return train_segmenter(d["images"], d["maps"], num_labels=2, lr=2e-3, **common)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_same_inputs_and_seed_give_bitwise_the_same_weights(kind: str, dims: int) -> None:
    first, again, other = (trained_network(kind, dims, seed=seed) for seed in (SEED, SEED, SEED + 1))
    assert_same(first.state_dict(), again.state_dict())
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())
    assert not first.training and not any(p.requires_grad for p in first.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_a_work_folder_resumes_through_the_function(kind: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    in_memory = trained_network(kind, 2)
    assert list(tmp_path.iterdir()) == []  # by default nothing is written
    run = RunSettings(seed=SEED, work_dir=tmp_path / "work", progress=None)
    with pytest.raises(KeyboardInterrupt):
        trained_network(kind, 2, run=replace(run, step_callback=Interrupt(INTERRUPT_AT)))
    resumed = trained_network(kind, 2, run=run)
    assert_same(in_memory.state_dict(), resumed.state_dict())
    assert load_state(run.checkpoint_path, expected_format=trainer_for(kind, 2, run).checkpoint_format)["step"] == STEPS


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_of_another_seed_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match=f"this training needs seed {SEED}"):
        trained_network(kind, 2, run=RunSettings(seed=SEED + 1, progress=None))
