"""Crash safety of ``medsynth run`` through the real CLI: ``kill -9`` during training, sampling and DICOM
export, then rerun; a second command on a busy output folder; stale locks; the cached rerun stays light.

After every kill the output folder may hold only complete files (stage folders appear whole, temporaries
are hidden), the rerun continues by itself (training from its last checkpoint) and ends with the weights
of an uninterrupted run, and MLflow holds exactly one parent run and one FINISHED run per stage.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import one_line_exit_2
from mlflow import MlflowClient
from PIL import Image

from medsynth.cli import main
from medsynth.io.atomic import file_digest, folder_lock
from medsynth.io.state import CHECKPOINT_FORMAT, MODEL_FORMAT, load_state

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "train", "sample", "augment"]
# Long enough that a kill lands inside each phase; tiny enough for a 2-core CPU.
FAULT_CONFIG = {
    "stages": STAGES,
    "train": {"max_steps": 16, "checkpoint_every": 2, "val_every": 8, "log_every": 2},
    "sample": {"num_samples": 8, "steps": 10, "batch_size": 4},
    "augment": {"ratio": 2.0, "steps": 2, "dicom": True, "audit": {"features": False}},
    "tracking": {"log_model": False},
}


# One torch thread per process: medsynth's setup() gives each process cpu_count / LOCAL_WORLD_SIZE threads
# (OMP_NUM_THREADS alone is overridden), and on a shared 2-core machine two threads per process run
# many times slower than one. The in-process reference run gets the same, so that both compute alike.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}


def env() -> dict[str, str]:
    """The session's MLflow store (set by conftest's fixture), one thread per process."""
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}


def launch(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth", "run", str(config)],
        env=env(),
        cwd=config.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(process: subprocess.Popen, ready, delay: float, timeout: float = 300) -> str:
    """SIGKILL ``process`` ``delay`` seconds after ``ready()`` first holds (it must still be running then);
    returns what it printed on stdout."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"exited before the kill point: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)
    time.sleep(delay)
    assert process.poll() is None, "finished before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return process.communicate()[0]


def wait_for_lock(out: Path, process: subprocess.Popen) -> None:
    """Until ``process`` holds the output folder's lock."""
    lock, deadline = out / ".medsynth.lock", time.monotonic() + 300
    while not (lock.is_file() and lock.read_text().strip() == str(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.01)


def hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def assert_only_complete_files(out: Path) -> None:
    """Every visible file reads back whole, and every visible stage folder matches its manifest byte for byte."""
    for path in sorted(out.rglob("*")):
        if hidden(path, out) or not path.is_file():
            continue
        name = path.name
        if name.endswith(".nii.gz"):
            nib.load(path).get_fdata()
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".npy"):
            np.load(path, allow_pickle=False)
        elif name.endswith(".png"):
            with Image.open(path) as image:
                image.load()
        elif name.endswith(".pt"):
            load_state(path, expected_format=MODEL_FORMAT if name == "model.pt" else CHECKPOINT_FORMAT)
        elif name.endswith(".yaml"):
            yaml.safe_load(path.read_text())
        elif name.endswith(".dcm"):
            assert pydicom.dcmread(path).pixel_array.size
        else:
            raise AssertionError(f"no completeness check for {path}")
    for folder in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = json.loads((folder / "manifest.json").read_text())
        for rel, info in manifest["outputs"].items():
            assert file_digest(folder / rel) == info["sha256"], f"{folder / rel} differs from its manifest"


# Not compared: wall-clock throughput, and the global Python / NumPy RNGs, which medsynth neither seeds
# nor uses in training (every process starts them from the OS; a resumed one restores the checkpoint's).
UNCOMPARED = {"train/images_per_s", "python", "numpy"}


def differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoint / model states differ (tensors with ``torch.equal``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for key in a if key not in UNCOMPARED for d in differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.slow
def test_kill_9_during_training_sampling_and_export_then_rerun(
    write_config, tmp_path: Path, monkeypatch, capsys
) -> None:
    rng = random.Random(20240611)
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)
    reference_config = write_config(
        FAULT_CONFIG
        | {
            "output_dir": str(tmp_path / "reference"),
            "tracking": {"log_model": False, "experiment": "faults-reference"},
        },
        name="reference.yaml",
    )
    assert main(["run", str(reference_config)]) == 0  # uninterrupted (in this process: the imports are paid already)
    config = write_config(FAULT_CONFIG | {"tracking": {"log_model": False, "experiment": "faults-killed"}})
    out = tmp_path / "out"
    kills = []

    # 1. training: after its first checkpoint
    process = launch(config)
    kill_when(process, lambda: (out / ".train.partial" / "checkpoints" / "last.pt").is_file(), rng.uniform(0, 0.1))
    kills.append("train")
    assert not (out / "train").exists() and (out / ".train.partial" / "checkpoints" / "last.pt").is_file()
    assert (out / ".medsynth.lock").is_file()  # left by the killed process: it must not block the rerun
    assert_only_complete_files(out)
    left = load_state(out / ".train.partial" / "checkpoints" / "last.pt", expected_format=CHECKPOINT_FORMAT)
    assert 2 <= left["step"] < 16

    # 2. sampling: while the NIfTI files are written. Training continued from the hidden checkpoint:
    # it says so, and its first progress line is past the checkpoint's step, not step 1.
    process = launch(config)
    printed = kill_when(process, lambda: any(out.glob(".sample.*.partial/images/*")), rng.uniform(0, 0.03))
    kills.append("sample")
    assert "train: continuing an interrupted run of this config" in printed, printed
    first = next(line for line in printed.splitlines() if line.startswith("train: step "))
    assert int(first.split()[2].split("/")[0]) > left["step"] >= 2, printed
    assert (out / "train" / "manifest.json").is_file() and not (out / "sample").exists()
    assert any(out.glob(".sample.*.partial"))  # a temporary the rerun must remove
    assert_only_complete_files(out)

    # 3. DICOM export of augment: while the series are written
    process = launch(config)
    kill_when(process, lambda: any(out.glob(".augment.*.partial/dicom/*")), rng.uniform(0, 0.03))
    kills.append("augment")
    assert (out / "sample" / "manifest.json").is_file() and not (out / "augment").exists()
    assert_only_complete_files(out)

    # 4. to the end; meanwhile a second command on the same folder is refused at once and harms nothing
    process = launch(config)
    wait_for_lock(out, process)
    capsys.readouterr()
    started = time.perf_counter()
    code = main(["run", str(config)])
    one_line_exit_2(code, capsys.readouterr().err, str(out), f"pid {process.pid}", "another medsynth process")
    assert time.perf_counter() - started < 30  # refused at once, not after waiting for the lock
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert kills == ["train", "sample", "augment"]
    assert_only_complete_files(out)
    assert not list(out.glob(".*")), list(out.glob(".*"))  # lock, record and temporaries gone

    # Same trained state as the uninterrupted run: weights, EMA, optimiser, LR schedule, torch RNG, step.
    ref = tmp_path / "reference"
    assert not differences(
        load_state(out / "train" / "model.pt", expected_format=MODEL_FORMAT),
        load_state(ref / "train" / "model.pt", expected_format=MODEL_FORMAT),
    )
    resumed = load_state(out / "train" / "checkpoints" / "last.pt", expected_format=CHECKPOINT_FORMAT)
    assert resumed["step"] == 16 and len(resumed["history"]) == 8
    assert not differences(
        resumed, load_state(ref / "train" / "checkpoints" / "last.pt", expected_format=CHECKPOINT_FORMAT)
    )
    assert np.array_equal(np.load(out / "sample" / "samples.npy"), np.load(ref / "sample" / "samples.npy"))
    assert np.array_equal(
        np.load(out / "augment" / "synthetic_images.npy"), np.load(ref / "augment" / "synthetic_images.npy")
    )
    assert len(list((out / "augment" / "dicom").iterdir())) == 16

    # MLflow: the killed runs were continued, not duplicated; none is left RUNNING.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("faults-killed")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "medsynth.stage" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert Counter(r.data.tags["medsynth.stage"] for r in runs if r not in parents) == Counter(STAGES)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs if r not in parents)
    train_run = next(r for r in runs if r.data.tags.get("medsynth.stage") == "train")
    assert train_run.data.tags.get("medsynth.continued") == "true"
    # every logged step once: none run twice, none lost to the kill
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "train/loss")] == list(range(2, 17, 2))


@pytest.mark.slow
def test_a_run_killed_with_another_config_gets_its_runs_ended_killed(
    write_config, tmp_path: Path, monkeypatch, capsys
) -> None:
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)
    config = write_config(
        {
            "stages": ["prepare", "train"],
            "train": {"max_steps": 16, "checkpoint_every": 2},
            "tracking": {"log_model": False, "experiment": "faults-changed"},
        }
    )
    out = tmp_path / "out"
    process = launch(config)
    kill_when(process, lambda: (out / ".train.partial" / "checkpoints" / "last.pt").is_file(), 0.0)
    # A different training config: refused, naming the keys, before any MLflow run starts ...
    capsys.readouterr()
    code = main(["run", str(config), "train.max_steps=3", "train.checkpoint_every=3"])
    one_line_exit_2(code, capsys.readouterr().err, "train.max_steps", "--force", ".train.partial")
    # ... and with --force the checkpoint is not resumed, the killed runs are ended KILLED, new ones start.
    assert main(["run", str(config), "train.max_steps=3", "train.checkpoint_every=3", "--force"]) == 0
    out_text = capsys.readouterr().out
    assert "continuing" not in out_text
    assert load_state(out / "train" / "checkpoints" / "last.pt", expected_format=CHECKPOINT_FORMAT)["step"] == 3
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("faults-changed").experiment_id])
    statuses = Counter((r.data.tags.get("medsynth.stage"), r.info.status) for r in runs)
    # killed: parent, prepare (done), train; the rerun with --force: parent, prepare, train
    assert statuses == Counter(
        {
            (None, "KILLED"): 1,
            ("prepare", "FINISHED"): 2,
            ("train", "KILLED"): 1,
            (None, "FINISHED"): 1,
            ("train", "FINISHED"): 1,
        }
    ), statuses
    assert not list(out.glob(".*"))


@pytest.mark.slow
def test_kill_9_then_a_memory_knob_continues_and_a_result_key_is_refused(
    write_config, tmp_path: Path, monkeypatch, capsys
) -> None:
    """After ``kill -9`` during training: a rerun with ``train.gradient_checkpointing=true`` (a memory knob:
    same weights) continues the checkpoint and ends with the weights of an uninterrupted run with that knob;
    a rerun with ``train.lr`` changed is refused in one line naming it, before any MLflow run starts."""
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)
    base = {
        "stages": ["prepare", "train"],
        "train": {"max_steps": 16, "checkpoint_every": 2, "log_every": 2, "val_every": 8},
        "tracking": {"log_model": False, "experiment": "faults-knob"},
    }
    reference = write_config(
        base
        | {"output_dir": str(tmp_path / "reference"), "tracking": {"log_model": False, "experiment": "faults-ref"}},
        name="reference.yaml",
    )
    assert main(["run", str(reference), "train.gradient_checkpointing=true"]) == 0
    config = write_config(base)
    out = tmp_path / "out"
    process = launch(config)
    kill_when(process, lambda: (out / ".train.partial" / "checkpoints" / "last.pt").is_file(), 0.05)
    left = load_state(out / ".train.partial" / "checkpoints" / "last.pt", expected_format=CHECKPOINT_FORMAT)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("faults-knob")
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    capsys.readouterr()
    code = main(["run", str(config), "train.lr=5e-4"])
    one_line_exit_2(code, capsys.readouterr().err, "train.lr", "--force")
    assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == before  # no run started
    assert (out / ".train.partial" / "checkpoints" / "last.pt").is_file()  # the checkpoint is kept

    assert main(["run", str(config), "train.gradient_checkpointing=true"]) == 0
    printed = capsys.readouterr().out
    assert "train: continuing an interrupted run of this config" in printed, printed
    first = next(line for line in printed.splitlines() if line.startswith("train: step "))
    assert int(first.split()[2].split("/")[0]) > left["step"], printed
    assert not differences(
        load_state(out / "train" / "model.pt", expected_format=MODEL_FORMAT),
        load_state(tmp_path / "reference" / "train" / "model.pt", expected_format=MODEL_FORMAT),
    )
    train_run = next(
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("medsynth.stage") == "train"
    )
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "train/loss")] == list(range(2, 17, 2))


def test_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    holder = (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from medsynth.io.atomic import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    os.kill(os.getpid(), 9)"
    )
    done = subprocess.run(
        [sys.executable, "-c", holder, str(folder), str(ROOT)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL
    assert (folder / ".medsynth.lock").read_text().strip().isdigit()  # its lock file stays, stale
    with folder_lock(folder) as path:
        assert path.read_text().strip() == str(os.getpid())
    assert not (folder / ".medsynth.lock").exists()


def test_cached_rerun_is_fast_and_imports_neither_torch_nor_mlflow(write_config, tmp_path: Path) -> None:
    config = write_config({"stages": ["prepare"], "tracking": {"experiment": "faults-cached"}})
    assert main(["run", str(config)]) == 0
    probe = (
        "import sys, time; start = time.perf_counter(); from medsynth.cli import main; "
        "code = main(['run', sys.argv[1]]); "
        "print(code, time.perf_counter() - start, 'torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(config)], env=env(), capture_output=True, text=True, timeout=60, check=False
    )
    code, seconds, torch_loaded, mlflow_loaded = done.stdout.splitlines()[-1].split()
    assert (code, torch_loaded, mlflow_loaded) == ("0", "False", "False"), done.stdout + done.stderr
    assert float(seconds) < 30, seconds  # about a second alone; the timing itself: benchmarks/pipeline_overhead.py
    assert "prepare: unchanged, skipped" in done.stdout
