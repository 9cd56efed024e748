"""MLflow tracking: the only module of medsynth that imports MLflow.

One parent run per ``medsynth run``, one nested run per stage tagged ``medsynth.stage=<name>``.
Params are the flattened resolved config; metrics, figures, the training data set
(``mlflow.log_input``) and the trained model (``mlflow.pytorch.log_model`` + a registry alias) go
to the stage run. Ranks other than 0 get a :class:`NullTracker` that records nothing.

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
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
        f"warning: MLflow tracking at {_SESSION.uri} failed ({_SESSION.lost}); medsynth goes on without tracking: training, "
        f"checkpoints and outputs are not affected, the rest of this command is not logged, and its open runs are closed by the "
        f"next medsynth command on the same output_dir",
        file=sys.stderr,
        flush=True,
    )


def _guarded(method: Callable) -> Callable:
    """A logging call that never stops the work: after a tracking failure it does nothing and returns None."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _SESSION.lost is not None:
            return None
        try:
            return method(*args, **kwargs)
        except _tracking_errors() as exc:
            _lose(exc)
            return None

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


class Tracker:
    """The active MLflow run of one stage (or the parent run).

    Every logging method is guarded: a store that fails is reported once and the work goes on.
    """

    def __init__(self, run: Any) -> None:
        import mlflow

        self._mlflow = mlflow
        self.run = run

    @property
    def enabled(self) -> bool:
        return _SESSION.lost is None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @_guarded
    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow params are strings of at most 6000 characters.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    @_guarded
    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_dataset(
        self, features: np.ndarray, *, source: str, name: str, context: str, targets: np.ndarray | None = None
    ) -> str:
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


class NullTracker:
    """Stands in for :class:`Tracker` on ranks > 0 and when tracking is off: records nothing."""

    enabled = False
    run_id = ""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


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
                raise MedsynthError(
                    f"MLflow tracking server {uri} (from {where}) {'did not answer as an MLflow server' if answered else 'is not reachable'} "
                    f"({_reason(exc)}); start it (see docs/team_setup.md) or set MLFLOW_TRACKING_URI (or tracking.uri) to a running one; "
                    f"nothing was run"
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
) -> Iterator[Tracker | NullTracker]:
    """Start an MLflow run; on an exception it ends as FAILED (KILLED on Ctrl-C) with the error text as a tag.

    The parent run (``stage=None``) and every stage run record the flattened resolved config as
    params, the code version and the git commit as tags.

    Args:
        invocation: an id tagged on every run of one medsynth command (``medsynth.invocation``), so that
            a later command finds the runs a killed one left open.
        continue_run: the id of such a run to continue (MLflow reopens it) instead of starting a new one.

    Yields:
        The run's :class:`Tracker`, or a :class:`NullTracker` once the store has failed.
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
) -> Tracker:
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
        tracker = Tracker(run)
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
        tracker = Tracker(mlflow.start_run(run_name=run_name, nested=nested, tags=tags))
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
