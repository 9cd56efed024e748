"""medsynth.tracking: both trackers implement the Tracker protocol with explicit methods, and the guard turns
a store that stops answering into one warning and empty answers."""

from __future__ import annotations

import inspect
import uuid

import mlflow
import pytest
import requests

from medsynth import tracking
from medsynth.tracking import MlflowTracker, NullTracker, Tracker

TRACKERS = (MlflowTracker, NullTracker)


def public_names(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh tracking session on the test store (the guard's state is per process)."""
    monkeypatch.setattr(tracking._SESSION, "uri", mlflow.get_tracking_uri())
    monkeypatch.setattr(tracking._SESSION, "lost", None)


@pytest.fixture
def mlflow_tracker(session) -> MlflowTracker:
    client = mlflow.MlflowClient()
    experiment = client.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    return MlflowTracker(client.create_run(experiment, run_name="tracked"))


def lose_store(monkeypatch: pytest.MonkeyPatch, method: str) -> list[int]:
    """Make ``MlflowClient.<method>`` fail as a tracking server that went away does; returns a call counter."""
    calls: list[int] = []

    def refused(self, *args, **kwargs):
        calls.append(1)
        raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(mlflow.MlflowClient, method, refused)
    return calls


@pytest.mark.parametrize("cls", TRACKERS, ids=lambda cls: cls.__name__)
def test_tracker_implements_the_protocol_and_nothing_else(cls: type) -> None:
    assert public_names(cls) == public_names(Tracker)
    for name in public_names(Tracker):
        expected = getattr(Tracker, name)
        if callable(expected):
            assert inspect.signature(getattr(cls, name)) == inspect.signature(expected), name


def test_both_trackers_are_trackers(mlflow_tracker: MlflowTracker) -> None:
    assert isinstance(mlflow_tracker, Tracker) and isinstance(NullTracker(), Tracker)
    assert not isinstance(object(), Tracker)


def test_null_tracker_records_nothing_and_rejects_unknown_names() -> None:
    null = NullTracker()
    assert not null.enabled and null.run_id == ""
    assert (
        null.log_metrics({"loss": 1.0}, step=1) is None
        and null.log_model(None, registered_name="m", alias="a", metadata={}) is None
    )
    assert null.current_run() is None and null.finished_runs({"k": "v"}, limit=3) == []
    assert null.model_versions("m", run_id="r") == [] and null.model_version_by_alias("m", "best") is None
    with pytest.raises(AttributeError, match="log_metric"):
        null.log_metric("loss", 1.0)  # misspelt: log_metrics


def test_queries_read_the_store(mlflow_tracker: MlflowTracker, capsys) -> None:
    mlflow_tracker.log_metrics_to_run(mlflow_tracker.run_id, {"eval/fid": 2.5, "eval/mmd": float("nan")})
    current = mlflow_tracker.current_run()
    assert current.run_id == mlflow_tracker.run_id and current.run_name == "tracked"
    assert current.metrics == {"eval/fid": 2.5}  # NaN left out
    assert mlflow_tracker.finished_runs({"medsynth.stage": "evaluate"}, limit=5) == []
    # A model or alias that is not there is an answer, not a failed store.
    assert mlflow_tracker.model_version_by_alias(f"absent-{uuid.uuid4().hex[:8]}", "best") is None
    assert mlflow_tracker.model_versions("absent", run_id=mlflow_tracker.run_id) == []
    assert mlflow_tracker.enabled and "warning" not in capsys.readouterr().err


def test_a_lost_store_costs_one_warning_and_answers_empty(
    mlflow_tracker: MlflowTracker, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    search = lose_store(monkeypatch, "search_runs")
    get_run = lose_store(monkeypatch, "get_run")
    assert mlflow_tracker.finished_runs({"medsynth.stage": "evaluate"}, limit=5) == []
    assert not mlflow_tracker.enabled and tracking.tracking_lost()
    # Later calls do not reach the store at all.
    assert mlflow_tracker.current_run() is None and mlflow_tracker.model_versions("m", run_id="r") == []
    mlflow_tracker.log_metrics({"loss": 1.0})
    assert len(search) == 1 and get_run == []
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow tracking") and "Connection refused" in lines[0]


def test_a_continued_run_does_not_log_a_step_twice(session) -> None:
    """After a kill the rerun reports the checkpoint's step again; the continued run keeps each step once."""
    mlflow.set_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        first = MlflowTracker(run)
        first.log_metrics({"train/loss": 1.0}, step=2)
        first.log_metrics({"train/loss": 0.8}, step=4)
    with mlflow.start_run(run_id=run.info.run_id) as again:
        continued = MlflowTracker(again, continued=True)
        continued.log_metrics({"train/loss": 0.8, "val/loss": 0.9}, step=4)  # step 4 again; val/loss is new
        continued.log_metrics({"train/loss": 0.7}, step=6)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.0), (4, 0.8), (6, 0.7)]
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/loss")] == [4]
