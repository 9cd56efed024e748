"""Reviewing evaluations across runs in MLflow: a summary table, a comparison figure, the ``best`` alias.

Feature metrics (FID, precision/recall, feature MMD) only compare between evaluations made with the
same feature network, on the same held-out real set, with the same number of synthetic images (FID
is biased by the sample count). Every evaluation records that as a *comparison key*
(:func:`comparison_key`), a tag on its MLflow run and on the registered model version it scored; the
table, the figure and the ``best`` alias only ever put side by side what shares a key.

MLflow has no "promote when better" of its own: :func:`promote_best` reads the current best version's
recorded value and moves the alias. Every store call goes through the run's
:class:`~medsynth.tracking.Tracker`, so a store that stops answering during a review costs a warning, never
the evaluation: its queries answer empty and the decision says the alias was left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medsynth.figures import _save  # noqa: E402

if TYPE_CHECKING:
    from medsynth.tracking import RunRecord, Tracker

# The metrics a review shows, when the evaluation produced them (lower is better unless listed in
# HIGHER_IS_BETTER or NEITHER).
KEY_METRICS = (
    "eval/fid",
    "eval/precision",
    "eval/recall",
    "eval/feature_mmd",
    "eval/diversity_ms_ssim/fake",
    "eval/mmd",
    "eval/audit/flagged_fraction",
    "eval/class/agreement",
    "eval/label/dice",
)
HIGHER_IS_BETTER = {"eval/precision", "eval/recall", "eval/class/agreement", "eval/label/dice"}
# Read against the real set's own value, not as better or worse.
NEITHER = {"eval/diversity_ms_ssim/fake"}
KEY_TAG = "medsynth.comparison_key"
STAGE_TAG = "medsynth.stage"
VALUE_TAG = "medsynth.best_value"
METRIC_TAG = "medsynth.best_metric"


def comparison_key(*, feature_weights_sha256: str, real_sha256: str, num_real: int, num_fake: int) -> str:
    """16 hex digits, equal exactly when two evaluations' feature metrics are comparable."""
    text = json.dumps([feature_weights_sha256, real_sha256, int(num_real), int(num_fake)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def earlier_evaluations(tracker: Tracker, *, key: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` finished evaluate runs of the tracker's experiment with the same comparison key,
    other than the tracker's own run, as table rows."""
    runs = tracker.finished_runs({STAGE_TAG: "evaluate", KEY_TAG: key}, limit=limit + 1)
    return [row(run, run.metrics) for run in runs if run.run_id != tracker.run_id][:limit]


def row(run: RunRecord, metrics: dict[str, float]) -> dict[str, Any]:
    """One evaluation as a table row: its run, its pipeline (parent) run, and the key metrics it has."""
    out: dict[str, Any] = {
        "run_id": run.run_id,
        "run_name": run.run_name or run.run_id[:8],
        "pipeline_run_id": run.parent_run_id,
        "start_time": run.start_time,
    }
    out |= {k: metrics.get(k) for k in KEY_METRICS}
    return out


def summary_rows(current: dict[str, Any], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This evaluation first (``this_run`` True), then the earlier comparable ones, newest first;
    only the metrics at least one of them has."""
    rows = [current | {"this_run": True}] + [r | {"this_run": False} for r in earlier]
    present = [k for k in KEY_METRICS if any(r.get(k) is not None and math.isfinite(r[k]) for r in rows)]
    keep = ["this_run", "run_name", "run_id", "pipeline_run_id", *present]
    return [{k: r.get(k) for k in keep} for r in rows]


def comparison_figure(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """One bar panel per key metric, one bar per run (oldest left, this run highlighted)."""
    metrics = [k for k in KEY_METRICS if k in rows[0]]
    ordered = list(reversed(rows))
    columns = min(3, max(1, len(metrics)))
    lines = max(1, math.ceil(len(metrics) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.9 * lines), squeeze=False)
    names = [r["run_name"].split("/")[0][:14] + ("*" if r["this_run"] else "") for r in ordered]
    for ax, metric in zip(axes.flat, metrics):
        values = [r.get(metric) if r.get(metric) is not None else math.nan for r in ordered]
        colours = ["tab:orange" if r["this_run"] else "tab:blue" for r in ordered]
        ax.bar(range(len(ordered)), values, color=colours)
        ax.set_xticks(range(len(ordered)), names, rotation=45, ha="right", fontsize=7)
        reading = (
            "close to real's"
            if metric in NEITHER
            else ("higher" if metric in HIGHER_IS_BETTER else "lower") + " is better"
        )
        ax.set_title(f"{metric.removeprefix('eval/')} ({reading})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_axis_off()
    fig.suptitle(title or "evaluations with the same feature network and held-out set (* this run)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _better(value: float, best: float, direction: str) -> bool:
    return value < best if direction == "min" else value > best


def promote_best(
    tracker: Tracker,
    *,
    registered_model: str,
    train_run_id: str,
    metric: str,
    value: float,
    direction: str,
    key: str,
    alias: str = "best",
) -> dict[str, Any]:
    """Tag the model version trained by ``train_run_id`` with this evaluation and move ``alias`` to it
    when it beats the version that holds the alias now.

    Returns ``{"decision": "moved" | "kept" | "skipped", "reason", "version", "previous_version",
    "previous_value"}``. The alias stays where it is when the current best was measured under another
    comparison key (the numbers do not compare) or has no recorded value, and when the store stops
    answering during the decision (``skipped``; the tracker has reported it).
    """
    result: dict[str, Any] = {
        "decision": "skipped",
        "metric": metric,
        "value": value,
        "alias": alias,
        "version": None,
        "previous_version": None,
        "previous_value": None,
    }
    if value is None or not math.isfinite(value):
        return result | {"reason": f"{metric} was not measured in this evaluation"}
    unanswered = {"decision": "skipped", "reason": f"the tracking store did not answer; '{alias}' is left where it was"}
    if not tracker.enabled:
        return result | unanswered
    decision = _decide(
        tracker, result, registered_model=registered_model, train_run_id=train_run_id, key=key, direction=direction
    )
    # A store lost on the way answered every later call empty: a decision made on those answers does not hold.
    return decision | unanswered if not tracker.enabled else decision


def _decide(
    tracker: Tracker, result: dict[str, Any], *, registered_model: str, train_run_id: str, key: str, direction: str
) -> dict[str, Any]:
    """:func:`promote_best` on the store's answers (``result`` holds the metric, its value and the alias)."""
    metric, value, alias = result["metric"], result["value"], result["alias"]
    versions = tracker.model_versions(registered_model, run_id=train_run_id)
    if not versions:
        return result | {
            "reason": f"no version of registered model '{registered_model}' comes from training run {train_run_id}"
        }
    version = str(max(int(v.version) for v in versions))
    result["version"] = version
    tracker.set_model_version_tags(
        registered_model, version, {METRIC_TAG: metric, VALUE_TAG: repr(float(value)), KEY_TAG: key}
    )
    best = tracker.model_version_by_alias(registered_model, alias)
    if best is None:
        tracker.set_model_alias(registered_model, alias, version)
        return result | {"decision": "moved", "reason": f"no version had the alias '{alias}' yet"}
    result["previous_version"] = best.version
    if best.version == version:
        return result | {
            "decision": "kept",
            "reason": f"version {version} already holds '{alias}'; its recorded value is updated",
        }
    tags = best.tags
    if tags.get(KEY_TAG) != key or tags.get(METRIC_TAG) != metric:
        return result | {
            "decision": "kept",
            "reason": f"version {best.version} was scored with another feature network, held-out set, "
            f"sample count or metric: not comparable",
        }
    try:
        previous = float(tags[VALUE_TAG])
    except (KeyError, ValueError):
        return result | {"decision": "kept", "reason": f"version {best.version} has no recorded {metric}"}
    result["previous_value"] = previous
    if _better(value, previous, direction):
        tracker.set_model_alias(registered_model, alias, version)
        return result | {
            "decision": "moved",
            "reason": f"{metric} {value:.4g} beats {previous:.4g} of version {best.version}",
        }
    return result | {
        "decision": "kept",
        "reason": f"{metric} {value:.4g} does not beat {previous:.4g} of version {best.version}",
    }
