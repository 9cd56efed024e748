"""medsynth.review against a real MLflow store (the session's sqlite store) through a tracker: comparable runs
only, the comparison figure, the best alias moving only when a comparable evaluation beats it, and left alone
when the store stops answering during the decision."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
import requests

from medsynth import review, tracking
from medsynth.tracking import MlflowTracker


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    # a fresh tracking session: the guard's state is per process
    monkeypatch.setattr(tracking._SESSION, "uri", mlflow.get_tracking_uri())
    monkeypatch.setattr(tracking._SESSION, "lost", None)
    return mlflow.MlflowClient()


def _tracker(client, experiment: str, run_id: str | None = None) -> MlflowTracker:
    """The tracker of run ``run_id`` (default: a new run of ``experiment``), as the evaluate stage has it."""
    return MlflowTracker(client.get_run(run_id) if run_id else client.create_run(experiment))


def _evaluation(client, experiment: str, key: str, fid: float, name: str) -> str:
    run = client.create_run(experiment, run_name=name, tags={review.STAGE_TAG: "evaluate", review.KEY_TAG: key})
    client.log_metric(run.info.run_id, "eval/fid", fid)
    client.log_metric(run.info.run_id, "eval/precision", 0.5)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _trained_version(client, experiment: str, model: str, tmp_path: Path) -> str:
    run = client.create_run(experiment, tags={review.STAGE_TAG: "train"})
    client.set_terminated(run.info.run_id)
    client.create_model_version(model, source=str(tmp_path), run_id=run.info.run_id)
    return run.info.run_id


def test_comparison_key_changes_with_each_ingredient() -> None:
    base = {"feature_weights_sha256": "a" * 64, "real_sha256": "b" * 64, "num_real": 64, "num_fake": 32}
    key = review.comparison_key(**base)
    assert len(key) == 16 and key == review.comparison_key(**base)
    for change in ({"feature_weights_sha256": "c" * 64}, {"real_sha256": "d" * 64}, {"num_real": 63}, {"num_fake": 33}):
        assert review.comparison_key(**(base | change)) != key


def test_earlier_evaluations_only_comparable_finished_runs(client, tmp_path: Path) -> None:
    experiment = client.create_experiment(f"review-{uuid.uuid4().hex[:8]}")
    same = [_evaluation(client, experiment, "k1", fid, f"run{i}") for i, fid in enumerate((3.0, 2.0, 1.0))]
    _evaluation(client, experiment, "k2", 0.1, "other-key")
    failed = client.create_run(experiment, tags={review.STAGE_TAG: "evaluate", review.KEY_TAG: "k1"})
    client.set_terminated(failed.info.run_id, status="FAILED")
    rows = review.earlier_evaluations(_tracker(client, experiment, same[-1]), key="k1", limit=10)
    assert [r["run_id"] for r in rows] == [same[1], same[0]]  # newest first, this run and other keys left out
    assert [r["eval/fid"] for r in rows] == [2.0, 3.0]
    assert len(review.earlier_evaluations(_tracker(client, experiment), key="k1", limit=2)) == 2

    current = {
        "run_id": "now",
        "run_name": "now",
        "pipeline_run_id": None,
        "start_time": 0,
        "eval/fid": 0.5,
        "eval/recall": None,
    }
    table = review.summary_rows(current, rows)
    assert table[0]["this_run"] and not table[1]["this_run"]
    assert (
        "eval/fid" in table[0] and "eval/precision" in table[0] and "eval/recall" not in table[0]
    )  # never measured: left out
    figure = review.comparison_figure(table, tmp_path / "cmp.png")
    assert figure.stat().st_size > 1000


def test_promote_best_moves_only_on_comparable_improvement(client, tmp_path: Path) -> None:
    experiment = client.create_experiment(f"best-{uuid.uuid4().hex[:8]}")
    model = f"m-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model)
    first, second, third, fourth = (_trained_version(client, experiment, model, tmp_path) for _ in range(4))
    tracker = _tracker(client, experiment)
    common = {"registered_model": model, "metric": "eval/fid", "direction": "min", "alias": "best"}

    decision = review.promote_best(tracker, train_run_id=first, value=5.0, key="k", **common)
    assert decision["decision"] == "moved" and client.get_model_version_by_alias(model, "best").version == 1
    decision = review.promote_best(tracker, train_run_id=second, value=6.0, key="k", **common)  # worse
    assert decision["decision"] == "kept" and decision["previous_value"] == 5.0
    assert client.get_model_version_by_alias(model, "best").version == 1
    decision = review.promote_best(
        tracker, train_run_id=third, value=1.0, key="other", **common
    )  # better, but not comparable
    assert decision["decision"] == "kept" and "not comparable" in decision["reason"]
    assert client.get_model_version_by_alias(model, "best").version == 1
    decision = review.promote_best(tracker, train_run_id=fourth, value=4.0, key="k", **common)  # better and comparable
    assert decision["decision"] == "moved" and decision["previous_version"] == "1"
    best = client.get_model_version_by_alias(model, "best")
    assert best.version == 4 and best.tags[review.VALUE_TAG] == "4.0" and best.tags[review.KEY_TAG] == "k"
    # higher-is-better metrics compare the other way
    decision = review.promote_best(tracker, train_run_id=second, value=4.5, key="k", **(common | {"direction": "max"}))
    assert decision["decision"] == "moved"


def test_promote_best_skips_without_value_or_version(client) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model)
    tracker = _tracker(client, client.create_experiment(f"skip-{uuid.uuid4().hex[:8]}"))
    common = {"registered_model": model, "metric": "eval/fid", "direction": "min", "key": "k"}
    assert review.promote_best(tracker, train_run_id="nope", value=float("nan"), **common)["decision"] == "skipped"
    decision = review.promote_best(tracker, train_run_id="0" * 32, value=1.0, **common)
    assert decision["decision"] == "skipped" and "no version" in decision["reason"]


def test_store_lost_during_promotion_leaves_the_alias_and_warns_once(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    experiment = client.create_experiment(f"lost-{uuid.uuid4().hex[:8]}")
    model = f"m-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model)
    first, second = (_trained_version(client, experiment, model, tmp_path) for _ in range(2))
    tracker = _tracker(client, experiment)
    common = {"registered_model": model, "metric": "eval/fid", "direction": "min", "alias": "best", "key": "k"}
    assert review.promote_best(tracker, train_run_id=first, value=5.0, **common)["decision"] == "moved"

    def refused(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")

    # The server goes away between tagging the new version and reading who holds the alias.
    by_alias = mlflow.MlflowClient.get_model_version_by_alias
    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", refused)
    decision = review.promote_best(tracker, train_run_id=second, value=1.0, **common)  # better, but unseen
    assert decision["decision"] == "skipped" and "did not answer" in decision["reason"]
    assert not tracker.enabled and by_alias(client, model, "best").version == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow tracking"), lines
