"""Shared fixtures: tiny configs, a per-session MLflow store, the tests folder on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One throw-away sqlite store for the whole session (creating one costs a few seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


TINY = {
    "name": "tiny",
    "seed": 0,
    "tracking": {"experiment": "medsynth-tests", "registered_model": "medsynth-tests"},
    "data": {
        "source": "phantom",
        "phantom": {"kind": "brain_mri", "count": 10, "shape": [16, 16]},
        "spatial_dims": 2,
        "image_size": [16, 16],
        "val_fraction": 0.2,
    },
    "model": {
        "channels": [8, 8],
        "attention_levels": [False, False],
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "num_head_channels": 8,
    },
    "diffusion": {"num_train_timesteps": 100},
    "train": {
        "batch_size": 4,
        "max_steps": 4,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "val_every": 2,
        "log_every": 2,
        "val_images": 4,
    },
    "sample": {"sampler": "ddim", "steps": 5, "num_samples": 4, "batch_size": 4},
    "evaluate": {"num_real": 4, "features": {"steps": 10, "slices_per_plane": 2}},
    "augment": {"ratio": 0.5, "steps": 3},
    "utility": {"steps": 5, "seeds": [0, 1]},
}

TINY_3D = {
    **TINY,
    "name": "tiny3d",
    "data": {
        "source": "phantom",
        "phantom": {"kind": "body_ct", "count": 6, "shape": [16, 16, 16]},
        "spatial_dims": 3,
        "image_size": [16, 16, 16],
        "val_fraction": 0.34,
    },
    "train": {**TINY["train"], "batch_size": 2, "max_steps": 2, "channels_last": False},
    "sample": {"sampler": "ddim", "steps": 3, "num_samples": 2, "batch_size": 2},
    "evaluate": {"num_real": 2, "features": {"steps": 10, "slices_per_plane": 2}},
    "augment": {"ratio": 0.5, "steps": 2},
}


class Interrupt:
    """Raises KeyboardInterrupt after a given step, as Ctrl-C between steps would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, step: int) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def one_line_exit_2(code: int, err: str, *expected: str) -> None:
    """The CLI's bad-input contract: exit code 2 and one line, ``error: ...``, holding every ``expected`` text."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a tiny config (plus changes) as YAML; returns its path. Outputs go under tmp_path/out."""

    def make(extra: dict | None = None, *, base: dict = TINY, name: str = "config.yaml") -> Path:
        config = deep_update(base, {"output_dir": str(tmp_path / "out")})
        config = deep_update(config, extra or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return make
