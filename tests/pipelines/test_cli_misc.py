"""CLI surface: --help everywhere, python -m medsynth, a failing stage's MLflow run ends FAILED."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from medsynth.cli import main


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["prepare", "--help"],
        ["train", "--help"],
        ["sample", "--help"],
        ["evaluate", "--help"],
        ["augment", "--help"],
    ],
)
def test_help_everywhere(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    assert "usage: medsynth" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "medsynth", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("medsynth ")


def test_unknown_command_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fly", "x.yaml"])
    assert info.value.code == 2


def test_failing_stage_run_ends_failed_with_the_error(write_config, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    config = write_config(
        {
            "data": {"source": "folder", "folder": str(tmp_path / "empty"), "modality": "mr"},
            "tracking": {"experiment": "medsynth-failures"},
        }
    )
    assert main(["run", str(config), "--stages", "prepare"]) == 2
    client = MlflowClient()
    experiment = client.get_experiment_by_name("medsynth-failures")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=2)
    stage_run = next(r for r in runs if r.data.tags.get("medsynth.stage") == "prepare")
    assert stage_run.info.status == "FAILED"
    assert "holds no NIfTI files" in stage_run.data.tags["medsynth.error"]
    parent = next(r for r in runs if "medsynth.stage" not in r.data.tags)
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_rectified_flow_trains_and_samples(write_config, tmp_path: Path, capsys) -> None:
    config = write_config(
        {
            "diffusion": {"scheduler": "rflow"},
            "sample": {"sampler": "rflow", "steps": 4},
            "stages": ["prepare", "train", "sample"],
            "tracking": {"log_model": False},
        }
    )
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    samples = np.load(tmp_path / "out" / "sample" / "samples.npy")
    assert samples.shape == (4, 1, 16, 16) and np.isfinite(samples).all()
    record = json.loads((tmp_path / "out" / "sample" / "samples.json").read_text())
    assert record["sampler"] == "rflow" and record["steps"] == 4
