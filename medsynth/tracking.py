"""MLflow tracking: the only module of medsynth that imports MLflow.

One parent run per ``medsynth run``, one nested run per stage tagged ``medsynth.stage=<name>``.
Params are the flattened resolved config; metrics, figures, the training data set
(``mlflow.log_input``) and the trained model (``mlflow.pytorch.log_model`` + a registry alias) go
to the stage run. Stages see a run through the :class:`Tracker` protocol: :class:`MlflowTracker` on rank 0,
a :class:`NullTracker` that records nothing on other ranks and once the store has failed. The evaluation
review's store queries (earlier runs, registered model versions and aliases) are tracker methods too.

A tracking server that does not answer at the start stops the command before any stage runs
(:func:`configure`, a :class:`MedsynthError` naming the URI). One that stops answering later never
costs trained work: the first failed logging call is reported once on stderr, and the rest of the
command runs on untracked (see docs/team_setup.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from medsynth import __version__
from medsynth.config import Config, flatten, to_plain
from medsynth.errors import MedsynthError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store
INVOCATION_TAG = "medsynth.invocation"  # the same id on the parent and stage runs of one (possibly resumed) command

# MLflow's own client settings for the reachability check at the start: one retry, a short timeout,
# so that a server that is down is reported in seconds (MLflow's defaults retry for minutes).
CHECK_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def code_version() -> dict[str, str]:
    """medsynth's version and, when run from a git checkout, the commit (with ``-dirty`` if modified)."""
    info = {"version": __version__}
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def resolve_tracking_uri(config: Config) -> str:
    """``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else MLflow's default."""
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _quiet_mlflow() -> None:
    # MLflow's alembic migrations and model-logging hints print several lines per run; the CLI's own
    # output should stay readable. Warnings and errors still show.
    for name in ("alembic", "mlflow", "mlflow.store.db.utils", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # medsynth logs its own model with the pickle flavour on purpose (the network takes two inputs,
    # which MLflow's pt2 export cannot trace without an example); the caution it prints is noted in
    # docs/user_guide.md instead of on every run.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # "View run at http://..." after every run of a tracking server: the stage lines say where outputs are.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class _Session:
    """This process's tracking store, and why tracking stopped (``lost``) if it did."""

    uri: str = ""
    lost: str | None = None


_SESSION = _Session()


def tracking_lost() -> bool:
    """Whether a logging call failed during this command (the rest of it runs untracked)."""
    return _SESSION.lost is not None


def _tracking_errors() -> tuple[type[BaseException], ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, OSError)


def _reason(exc: BaseException) -> str:
    """The gist of an MLflow client error in a few words (its messages hold whole URLs and reprs)."""
    text = " ".join(str(getattr(exc, "message", None) or exc or type(exc).__name__).split())
    for pattern in (
        r"\[Errno -?\d+\] ([^'\")(]+)",
        r"(Read timed out|timed out|Connection aborted|Connection reset by peer|RemoteDisconnected)",
        r"(too many \d+ error responses)",
    ):
        found = re.search(pattern, text)
        if found:
            return found.group(1).strip().rstrip(".")
    found = re.search(r"error code (\d+) != 200", text)
    if found:
        return f"HTTP {found.group(1)}"
    return text[:200]


def _lose(exc: BaseException) -> None:
    """Stop tracking for the rest of this command and say so once."""
    if _SESSION.lost is not None:
        return
    _SESSION.lost = _reason(exc)
    print(
        f"warning: MLflow tracking at {_SESSION.uri} failed ({_SESSION.lost}); medsynth goes on without tracking: "
        "training, checkpoints and outputs are not affected, the rest of this command is not logged, and its open "
        "runs are closed by the next medsynth command on the same output_dir",
        file=sys.stderr,
        flush=True,
    )


def _guarded(method: Callable | None = None, *, lost: Callable[[], Any] = lambda: None) -> Callable:
    """A store call that never stops the work: after a tracking failure it does nothing and returns ``lost()``
    (None unless given, e.g. ``lost=list`` for a query whose answer is a list)."""
    if method is None:
        return functools.partial(_guarded, lost=lost)

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _SESSION.lost is not None:
            return lost()
        try:
            return method(*args, **kwargs)
        except _tracking_errors() as exc:
            _lose(exc)
            return lost()

    return call


@contextlib.contextmanager
def _mlflow_http_settings(settings: dict[str, str]) -> Iterator[None]:
    """Set MLflow client environment variables for a block (MLflow reads them on every request)."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# The tracker protocol
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """A run as the store holds it: what a review of earlier evaluations reads."""

    run_id: str
    run_name: str | None = None
    parent_run_id: str | None = None
    start_time: int | None = None  # ms since the epoch
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersionRecord:
    """A version of a registered model: its number, the run that logged it, its tags."""

    version: str
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Tracker(Protocol):
    """Everything a stage may ask of its run's tracking (``ctx.tracker``).

    Implemented by :class:`MlflowTracker` and :class:`NullTracker`. No call ever stops the work: once the
    store has failed (reported once on stderr) logging calls do nothing and queries answer empty.
    """

    @property
    def enabled(self) -> bool:
        """Whether calls reach a store (False on ranks > 0 and once the store has failed)."""
        ...

    @property
    def run_id(self) -> str:
        """This run's id; empty when nothing is tracked."""
        ...

    # -- this run --------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log the finite values of ``metrics``; None, NaN and inf are left out."""
        ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(
        self, features: np.ndarray, *, source: str, name: str, context: str, targets: np.ndarray | None = None
    ) -> str | None:
        """Log a data set as a run input; returns its digest (None when not tracked)."""
        ...

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...

    def log_model(self, model: Any, *, registered_name: str | None, alias: str, metadata: dict[str, Any]) -> str | None:
        """Log (and register, with ``alias``) a model; returns its URI (None when not tracked)."""
        ...

    # -- other runs of the experiment --------------------------------------------------------------

    def current_run(self) -> RunRecord | None:
        """This run as the store holds it now (None when not tracked)."""
        ...

    def finished_runs(self, tags: dict[str, str], *, limit: int) -> list[RunRecord]:
        """The newest ``limit`` FINISHED runs of this run's experiment that carry every tag in ``tags``."""
        ...

    def log_artifact_to_run(self, run_id: str, path: str | Path) -> None:
        """Log a file to another run (e.g. the pipeline's parent run)."""
        ...

    def log_metrics_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        """Log the finite values of ``metrics`` to another run."""
        ...

    # -- model registry --------------------------------------------------------------------------

    def model_versions(self, name: str, *, run_id: str) -> list[ModelVersionRecord]:
        """The versions of registered model ``name`` logged by run ``run_id``."""
        ...

    def model_version_by_alias(self, name: str, alias: str) -> ModelVersionRecord | None:
        """The version that holds ``alias`` (None when none does, or the model is not registered)."""
        ...

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None: ...

    def set_model_alias(self, name: str, alias: str, version: str) -> None: ...


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


# MLflow's answers to a lookup of something that is not there (the store itself is fine).
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _run_record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name,
        parent_run_id=run.data.tags.get("mlflow.parentRunId"),
        start_time=run.info.start_time,
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def _version_record(version: Any) -> ModelVersionRecord:
    return ModelVersionRecord(version=str(version.version), run_id=version.run_id, tags=dict(version.tags or {}))


class MlflowTracker:
    """The active MLflow run of one stage (or the parent run): a :class:`Tracker`.

    Every method is guarded: a store that fails is reported once and the work goes on.
    """

    def __init__(self, run: Any, *, continued: bool = False) -> None:
        import mlflow

        self._mlflow = mlflow
        self._run = run
        # A continued run (after a kill) holds the metrics its first life logged: per metric, the last step
        # logged, read from the store on first use, so that a step reported again is not logged twice.
        self._logged: dict[str, float] | None = {} if continued else None

    @property
    def enabled(self) -> bool:
        return _SESSION.lost is None

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    # -- this run --------------------------------------------------------------------------------

    @_guarded
    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow params are strings of at most 6000 characters.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        finite = _finite(metrics)
        if self._logged is not None and step is not None:
            finite = {key: value for key, value in finite.items() if step > self._last_logged_step(key)}
        if finite:
            self._mlflow.log_metrics(finite, step=step)
            if self._logged is not None and step is not None:
                self._logged.update(dict.fromkeys(finite, step))

    def _last_logged_step(self, key: str) -> float:
        if key not in self._logged:
            history = self._mlflow.MlflowClient().get_metric_history(self.run_id, key)
            self._logged[key] = max((m.step for m in history), default=-float("inf"))
        return self._logged[key]

    @_guarded
    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_dataset(
        self, features: np.ndarray, *, source: str, name: str, context: str, targets: np.ndarray | None = None
    ) -> str | None:
        """Log a data set with ``mlflow.log_input``; returns MLflow's digest of it."""
        with warnings.catch_warnings():
            # A local path matches two equivalent MLflow source types; MLflow picks one and warns.
            warnings.simplefilter("ignore", UserWarning)
            dataset = self._mlflow.data.from_numpy(features, source=source, targets=targets, name=name)
        self._mlflow.log_input(dataset, context=context)
        return dataset.digest

    @_guarded
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table (one dict per row, same keys) shown in the MLflow UI's artifact and evaluation views."""
        columns = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        self._mlflow.log_table(data=columns, artifact_file=artifact_file)

    @_guarded
    def log_model(self, model: Any, *, registered_name: str | None, alias: str, metadata: dict[str, Any]) -> str | None:
        """``mlflow.pytorch.log_model`` under the name ``model``; register it and set ``alias``.

        Returns the registered ``models:/name@alias`` URI, or the run's model URI when not registered.
        """
        import torch

        requirements = [f"torch=={torch.__version__.split('+')[0]}", "monai", f"medsynth=={__version__}"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = self._mlflow.pytorch.log_model(
                model,
                name="model",
                registered_model_name=registered_name,
                pip_requirements=requirements,
                metadata=metadata,
                await_registration_for=0,
                serialization_format="pickle",
            )
        if registered_name is None:
            return info.model_uri
        client = self._mlflow.MlflowClient()
        version = info.registered_model_version
        client.set_registered_model_alias(registered_name, alias, str(version))
        return f"models:/{registered_name}@{alias}"

    # -- other runs of the experiment --------------------------------------------------------------

    @_guarded
    def current_run(self) -> RunRecord | None:
        return _run_record(self._mlflow.MlflowClient().get_run(self.run_id))

    @_guarded(lost=list)
    def finished_runs(self, tags: dict[str, str], *, limit: int) -> list[RunRecord]:
        conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        runs = self._mlflow.MlflowClient().search_runs(
            [self._run.info.experiment_id],
            filter_string=" and ".join([*conditions, "attributes.status = 'FINISHED'"]),
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )
        return [_run_record(run) for run in runs]

    @_guarded
    def log_artifact_to_run(self, run_id: str, path: str | Path) -> None:
        self._mlflow.MlflowClient().log_artifact(run_id, str(path))

    @_guarded
    def log_metrics_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = [Metric(key, value, now, 0) for key, value in _finite(metrics).items()]
        if finite:
            self._mlflow.MlflowClient().log_batch(run_id, metrics=finite)

    # -- model registry --------------------------------------------------------------------------

    @_guarded(lost=list)
    def model_versions(self, name: str, *, run_id: str) -> list[ModelVersionRecord]:
        found = self._mlflow.MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return [_version_record(version) for version in found]

    @_guarded
    def model_version_by_alias(self, name: str, alias: str) -> ModelVersionRecord | None:
        try:
            found = self._mlflow.MlflowClient().get_model_version_by_alias(name, alias)
        except self._mlflow.exceptions.MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise  # the store failed: the guard reports it
        return _version_record(found)

    @_guarded
    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        client = self._mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

    @_guarded
    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        self._mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


class NullTracker:
    """A :class:`Tracker` that records nothing: on ranks > 0, and for runs opened after the store has failed.

    Logging calls do nothing and queries answer empty; a name the protocol does not have raises
    AttributeError like on any object.
    """

    enabled = False
    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None

    def set_tags(self, tags: dict[str, Any]) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_dataset(
        self, features: np.ndarray, *, source: str, name: str, context: str, targets: np.ndarray | None = None
    ) -> str | None:
        return None

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        return None

    def log_model(self, model: Any, *, registered_name: str | None, alias: str, metadata: dict[str, Any]) -> str | None:
        return None

    def current_run(self) -> RunRecord | None:
        return None

    def finished_runs(self, tags: dict[str, str], *, limit: int) -> list[RunRecord]:
        return []

    def log_artifact_to_run(self, run_id: str, path: str | Path) -> None:
        return None

    def log_metrics_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        return None

    def model_versions(self, name: str, *, run_id: str) -> list[ModelVersionRecord]:
        return []

    def model_version_by_alias(self, name: str, alias: str) -> ModelVersionRecord | None:
        return None

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        return None

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# The store: model files, configuration, runs
# ---------------------------------------------------------------------------------------------


def fetch_model_file(uri: str, dst_dir: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download the weights-only ``model.pt`` that training logged beside an MLflow model.

    The pickled MLflow model itself is never loaded (that would run code from the store); training
    logs the state-dict file as the run artifact ``medsynth/model.pt``, and this fetches it.

    Args:
        uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<name>/latest``,
            ``runs:/<run_id>`` (its ``medsynth/model.pt``) or ``runs:/<run_id>/<path to a .pt file>``.
        dst_dir: where to put the file.
        tracking_uri: the store; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.

    Raises:
        MedsynthError: a malformed URI, or a model / run / file the store does not have.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    artifact = "medsynth/model.pt"
    try:
        if uri.startswith("models:/"):
            ref = uri.removeprefix("models:/")
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in ref:
                name, number = ref.rsplit("/", 1)
                if number == "latest":
                    versions = client.search_model_versions(f"name='{name}'")
                    if not versions:
                        raise MedsynthError(f"--model-uri {uri}: registered model '{name}' has no versions in {store}")
                    version = max(versions, key=lambda v: int(v.version))
                else:
                    version = client.get_model_version(name, number)
            else:
                raise MedsynthError(f"--model-uri {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
            run_id = version.run_id
        elif uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            if path.endswith(".pt"):
                artifact = path
        else:
            raise MedsynthError(f"--model-uri {uri}: expected a models:/ or runs:/ URI")
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(dst_dir), tracking_uri=store
        )
    except MlflowException as exc:
        message = " ".join(str(exc.message if hasattr(exc, "message") else exc).split())[:200]
        raise MedsynthError(f"--model-uri {uri}: not found in {store} ({message})") from None
    except OSError as exc:
        raise MedsynthError(
            f"--model-uri {uri}: no medsynth model file '{artifact}' in that run ({exc.strerror or exc})"
        ) from None
    return Path(local)


def configure(config: Config) -> None:
    """Point MLflow at the tracking URI and experiment of ``config``, and check that the store answers.

    Raises:
        MedsynthError: the store does not answer (named by its URI, with what to do), within seconds:
            the check runs with one retry and a short timeout (``CHECK_HTTP_SETTINGS``).
    """
    import mlflow

    _quiet_mlflow()
    uri = resolve_tracking_uri(config)
    # (before set_tracking_uri, which exports MLFLOW_TRACKING_URI for subprocesses)
    where = (
        "tracking.uri"
        if config.tracking.uri
        else "MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "MLflow's default"
    )
    _SESSION.uri, _SESSION.lost = uri, None
    mlflow.set_tracking_uri(uri)
    with _mlflow_http_settings(CHECK_HTTP_SETTINGS):
        try:
            mlflow.set_experiment(config.tracking.experiment)
        except Exception as exc:  # noqa: BLE001 - whatever the store says, the user gets one line
            import requests

            if isinstance(exc, requests.RequestException) or "API request to" in str(exc):
                answered = re.search(r"error code \d+ != 200", str(exc)) is not None
                status = "did not answer as an MLflow server" if answered else "is not reachable"
                raise MedsynthError(
                    f"MLflow tracking server {uri} (from {where}) {status} ({_reason(exc)}); start it (see "
                    "docs/team_setup.md) or set MLFLOW_TRACKING_URI (or tracking.uri) to a running one; nothing was run"
                ) from None
            raise MedsynthError(
                f"MLflow tracking store {uri} (from {where}) cannot be used ({_reason(exc)}); nothing was run"
            ) from None


@contextlib.contextmanager
def start_run(
    config: Config,
    *,
    run_name: str,
    stage: str | None,
    nested: bool,
    config_path: str,
    invocation: str | None = None,
    continue_run: str | None = None,
) -> Iterator[Tracker]:
    """Start an MLflow run; on an exception it ends as FAILED (KILLED on Ctrl-C) with the error text as a tag.

    The parent run (``stage=None``) and every stage run record the flattened resolved config as
    params, the code version and the git commit as tags.

    Args:
        invocation: an id tagged on every run of one medsynth command (``medsynth.invocation``), so that
            a later command finds the runs a killed one left open.
        continue_run: the id of such a run to continue (MLflow reopens it) instead of starting a new one.

    Yields:
        The run's :class:`MlflowTracker`, or a :class:`NullTracker` once the store has failed.
    """
    tracker = _open_run(
        config,
        run_name=run_name,
        stage=stage,
        nested=nested,
        config_path=config_path,
        invocation=invocation,
        continue_run=continue_run,
    )
    if tracker is None:  # the store failed (reported once): the work goes on untracked
        yield NullTracker()
        return
    try:
        yield tracker
    except BaseException as exc:
        _end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", error=str(exc) or type(exc).__name__)
        raise
    _end_run("FINISHED")


@_guarded
def _open_run(
    config: Config,
    *,
    run_name: str,
    stage: str | None,
    nested: bool,
    config_path: str,
    invocation: str | None,
    continue_run: str | None,
) -> MlflowTracker:
    import mlflow

    params = flatten(to_plain(config))
    if continue_run is not None:
        from mlflow.exceptions import MlflowException

        try:
            run = mlflow.start_run(run_id=continue_run, nested=nested)
        except MlflowException:  # deleted or gone from the store meanwhile: a new run instead
            return _open_run.__wrapped__(
                config,
                run_name=run_name,
                stage=stage,
                nested=nested,
                config_path=config_path,
                invocation=invocation,
                continue_run=None,
            )
        tracker = MlflowTracker(run, continued=True)
        # Params logged before the kill stay; MLflow refuses to log a param again with another value.
        params = {key: value for key, value in params.items() if key not in run.data.params}
        tracker.set_tags({"medsynth.continued": "true"})
    else:
        version = code_version()
        tags = {
            "medsynth.config": config_path,
            "medsynth.version": version["version"],
            "medsynth.pipeline": config.name,
        }
        if "git_commit" in version:
            tags["mlflow.source.git.commit"] = version["git_commit"].removesuffix("-dirty")
            tags["medsynth.git_commit"] = version["git_commit"]
        if stage is not None:
            tags["medsynth.stage"] = stage
        if invocation is not None:
            tags[INVOCATION_TAG] = invocation
        tracker = MlflowTracker(mlflow.start_run(run_name=run_name, nested=nested, tags=tags))
    tracker.log_params(params)
    return tracker


def _end_run(status: str, *, error: str | None = None) -> None:
    import mlflow

    if _SESSION.lost is None:
        try:
            if error is not None:
                mlflow.set_tag("medsynth.error", error[:5000])
            mlflow.end_run(status=status)
            return
        except _tracking_errors() as exc:
            _lose(exc)
    # The store has failed: MLflow forgets the run locally before it tells the store, so one quick
    # try (no retries) is enough to leave no active run behind; the next command closes it.
    with (
        _mlflow_http_settings({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}),
        contextlib.suppress(Exception),
    ):
        mlflow.end_run(status=status)


@_guarded
def invocation_runs(experiment: str, invocation: str) -> list[Any]:
    """The runs of the current store tagged with ``invocation`` in ``experiment`` (None when the store fails)."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1000
    )


@_guarded
def close_run(run_id: str, status: str, note: str) -> None:
    """End a run that a killed command left RUNNING, with a note saying why and by whom."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, "medsynth.note", note)
    client.set_terminated(run_id, status)


def end_killed_runs(uri: str, experiment: str, invocation: str, note: str) -> str | None:
    """Mark KILLED the RUNNING runs of ``invocation`` (a killed command) in the store at ``uri``, which need not
    be the current one, with ``note`` as the tag ``medsynth.note``.

    Returns:
        None when done, else why not (the store did not answer in seconds: one retry, a short timeout).
    """
    import mlflow

    with _mlflow_http_settings(CHECK_HTTP_SETTINGS):
        try:
            client = mlflow.MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            running = (
                []
                if found is None
                else client.search_runs(
                    [found.experiment_id],
                    filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}' and attributes.status = 'RUNNING'",
                )
            )
            for run in running:
                client.set_tag(run.info.run_id, "medsynth.note", note)
                client.set_terminated(run.info.run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - the runs of another command: report, never fail on them
            return _reason(exc)
    return None
