"""A team MLflow tracking server (``mlflow server``: SQL backend + artifact store) started on loopback:
a pipeline logs everything there; a server that is down is refused at the start in seconds; a server
lost during training costs no training, and one lost during the evaluation's review of earlier runs costs
one warning, not the evaluation (docs/team_setup.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import one_line_exit_2
from mlflow import MlflowClient

from medsynth.cli import main
from medsynth.io.atomic import file_digest
from medsynth.io.state import CHECKPOINT_FORMAT, MODEL_FORMAT, load_state

ROOT = Path(__file__).resolve().parents[2]
# One torch thread per medsynth process (see tests/pipelines/test_faults.py).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``mlflow server`` in a process group of its own (so that it can be killed whole)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # No background job runner: it is not needed here and starts a dozen more processes.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_until_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"mlflow server exited: {self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"mlflow server did not answer in {timeout} s: {self.log.read_text()[-3000:]}"
            )
            time.sleep(0.25)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("team_server"))
    try:
        server.wait_until_up()
        yield server
    finally:
        server.kill()


def run_medsynth(config: Path, uri: str, **extra_env: str) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth", "run", str(config)],
        env=env,
        cwd=config.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_pipeline_logs_runs_params_metrics_artifacts_and_model_to_a_team_server(
    team_server: Server, write_config, tmp_path: Path
) -> None:
    config = write_config(
        {
            "stages": ["prepare", "train", "sample"],
            "tracking": {"experiment": "team", "registered_model": "team-model", "model_alias": "current"},
        }
    )
    process = run_medsynth(config, team_server.uri)
    _, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=team_server.uri)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags.get("medsynth.stage"): r for r in runs}
    assert len(runs) == 4 and set(stages) == {None, "prepare", "train", "sample"}
    parent = stages.pop(None)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    assert (
        parent.data.params["train.max_steps"] == "4" and parent.data.tags["medsynth.stages"] == "prepare,train,sample"
    )
    train = stages["train"]
    assert (
        train.data.params["model.channels"] == "[8, 8]"
        and "train/loss" in train.data.metrics
        and "val/loss" in train.data.metrics
    )
    assert train.inputs.dataset_inputs  # mlflow.log_input
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"loss_curve.png", "config.yaml", "manifest.json", "medsynth"} <= artifacts
    assert "grid.png" in {a.path for a in client.list_artifacts(stages["sample"].info.run_id)}
    # The artifacts live in the server's artifact store, byte for byte.
    served = mlflow.artifacts.download_artifacts(
        run_id=train.info.run_id,
        artifact_path="medsynth/model.pt",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=team_server.uri,
    )
    assert file_digest(served) == file_digest(tmp_path / "out" / "train" / "model.pt")
    assert list((team_server.folder / "artifacts").rglob("loss_curve.png"))
    # The registered model and its alias point at the training run.
    version = client.get_model_version_by_alias("team-model", "current")
    assert version.run_id == train.info.run_id
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(team_server.uri)
    try:
        model = mlflow.pytorch.load_model("models:/team-model@current")
    finally:
        mlflow.set_tracking_uri(before)  # MLflow keeps the last URI (and exports it) process-wide
    assert sum(p.numel() for p in model.parameters()) > 0


def test_unreachable_server_is_refused_at_start_in_seconds(write_config, tmp_path: Path, monkeypatch, capsys) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    config = write_config({"output_dir": str(tmp_path / "never")})
    started = time.perf_counter()
    try:
        code = main(["run", str(config)])
    finally:
        mlflow.set_tracking_uri(before)  # MLflow keeps the last URI (and exports it) process-wide
    seconds = time.perf_counter() - started
    one_line_exit_2(
        code,
        capsys.readouterr().err,
        f"MLflow tracking server {dead}",
        "not reachable",
        "MLFLOW_TRACKING_URI",
        "start it",
    )
    assert seconds < 15, seconds
    assert not (tmp_path / "never").exists()  # nothing written, not even the output folder


@pytest.mark.slow
def test_server_lost_during_the_review_costs_one_warning_not_the_evaluation(
    write_config, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The server dies just as the evaluation asks it for the earlier comparable runs."""
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server")  # its own: the module's server is killed by the last test
    search_runs = MlflowClient.search_runs

    def server_dies_at_the_review(self, *args, **kwargs):
        if "medsynth.comparison_key" in str(kwargs.get("filter_string", args)):
            server.kill()
        return search_runs(self, *args, **kwargs)

    config = write_config(
        {
            "stages": ["prepare", "train", "sample", "evaluate"],
            "tracking": {"experiment": "team-review-lost", "registered_model": "team-review-lost"},
        }
    )
    before = mlflow.get_tracking_uri()
    try:
        server.wait_until_up()
        monkeypatch.setattr(MlflowClient, "search_runs", server_dies_at_the_review)
        # MLflow's own client settings: fail a request to a dead server at once (its defaults retry for minutes).
        for key, value in {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}.items():
            monkeypatch.setenv(key, value)
        code = main(["run", str(config)])
    finally:
        mlflow.set_tracking_uri(before)  # MLflow keeps the last URI (and exports it) process-wide
        server.kill()
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert server.process.returncode is not None  # the server did die during the run
    assert "Traceback" not in captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: MLflow tracking")]
    assert len(warnings) == 1 and server.uri in warnings[0], captured.err[-3000:]
    assert "evaluate: done" in captured.out
    # Every output of the evaluation is written; the review shows this run only and leaves the alias alone.
    out = tmp_path / "out" / "evaluate"
    assert json.loads((out / "metrics.json").read_text())["metrics"]["eval/fid"] is not None
    assert json.loads((out / "manifest.json").read_text())["mlflow_run_id"]
    assert [row["this_run"] for row in json.loads((out / "evaluation_summary.json").read_text())["rows"]] == [True]
    decision = json.loads((out / "best_alias.json").read_text())
    assert decision["decision"] == "skipped" and "did not answer" in decision["reason"]


@pytest.mark.slow
def test_server_lost_during_training_costs_no_training(team_server: Server, write_config, tmp_path: Path) -> None:
    """Last in this module: it kills the module's server."""
    config = write_config(
        {
            "stages": ["prepare", "train", "sample"],
            "train": {"max_steps": 24, "checkpoint_every": 4, "log_every": 1},
            "tracking": {"experiment": "team-lost", "registered_model": "team-lost-model"},
        }
    )
    out = tmp_path / "out"
    # MLflow's own client settings: fail a request to a dead server at once (its defaults retry for minutes).
    process = run_medsynth(
        config, team_server.uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"
    )
    deadline = time.monotonic() + 300
    while not (out / ".train.partial" / "checkpoints" / "last.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    team_server.kill()
    out_text, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow tracking")]
    assert len(warnings) == 1 and team_server.uri in warnings[0] and "goes on without tracking" in warnings[0], err[
        -3000:
    ]
    assert "train: done" in out_text and "sample: done" in out_text
    # Every step trained and checkpointed; the model file is complete; later stages ran on it.
    checkpoint = load_state(out / "train" / "checkpoints" / "last.pt", expected_format=CHECKPOINT_FORMAT)
    assert checkpoint["step"] == 24 and [h["step"] for h in checkpoint["history"]] == list(range(1, 25))
    assert load_state(out / "train" / "model.pt", expected_format=MODEL_FORMAT)["step"] == 24
    # Tracking stopped inside the training stage: its run had started, its model was not logged, sample ran untracked.
    train_manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert train_manifest["mlflow_run_id"] and train_manifest["summary"]["model_uri"] is None
    assert json.loads((out / "sample" / "manifest.json").read_text())["mlflow_run_id"] is None
    # The record of this command's runs stays, so that the next command on this folder closes them.
    assert (out / ".medsynth-invocation.json").is_file() and not (out / ".medsynth.lock").exists()
