"""``torchrun --nproc_per_node=2`` on CPU (gloo): the same training, rank 0 alone writes and logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsynth.cli import main
from medsynth.io.state import MODEL_FORMAT, load_state


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(write_config, tmp_path: Path, capsys) -> None:
    config = write_config({"train": {"max_steps": 3, "batch_size": 4}, "tracking": {"log_model": False}})
    assert main(["prepare", str(config)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "medsynth",
        "train",
        str(config),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("train: done") == 1  # rank 0 alone reports
    out = tmp_path / "out"
    distributed = load_state(out / "train" / "model.pt", expected_format=MODEL_FORMAT)["state_dict"]

    capsys.readouterr()
    assert main(["train", str(config), "--force"]) == 0
    single = load_state(out / "train" / "model.pt", expected_format=MODEL_FORMAT)["state_dict"]
    # The global batch is split across ranks and gradients are averaged: the same update up to
    # floating-point summation order. Adam turns summation noise on near-zero gradients into steps of
    # up to lr (1e-3) on a few weights, so: almost every weight equal, none off by a whole step. With
    # other noise or data, the typical weight would differ by about lr.
    diff = torch.cat([(single[k].float() - distributed[k].float()).abs().flatten() for k in single])
    assert diff.median() < 1e-6 and diff.max() < 1e-3, (diff.median(), diff.max())


@pytest.mark.slow
def test_torchrun_whole_pipeline(write_config, tmp_path: Path) -> None:
    config = write_config({"train": {"max_steps": 2}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "medsynth",
        "run",
        str(config),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("prepare", "train", "sample", "evaluate", "augment"):
        assert done.stdout.count(f"{stage}: done") == 1  # run once, reported by rank 0
        assert (tmp_path / "out" / stage / "manifest.json").is_file()
