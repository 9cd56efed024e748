"""MLflow tracking: the only module of medsynth that imports MLflow.

One parent run per ``medsynth run``, one nested run per stage tagged ``medsynth.stage=<name>``.
Params are the flattened resolved config; metrics, figures, the training data set
(``mlflow.log_input``) and the trained model (``mlflow.pytorch.log_model`` + a registry alias) go
to the stage run. Ranks other than 0 get a :class:`NullTracker` that records nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import __version__
from medsynth.config import Config, flatten, to_plain

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store


def code_version() -> dict[str, str]:
    """medsynth's version and, when run from a git checkout, the commit (with ``-dirty`` if modified)."""
    info = {"version": __version__}
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
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


class Tracker:
    """The active MLflow run of one stage (or the parent run)."""

    enabled = True

    def __init__(self, run: Any) -> None:
        import mlflow

        self._mlflow = mlflow
        self.run = run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow params are strings of at most 6000 characters.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dataset(self, features: np.ndarray, *, source: str, name: str, context: str, targets: np.ndarray | None = None) -> str:
        """Log a data set with ``mlflow.log_input``; returns MLflow's digest of it."""
        with warnings.catch_warnings():
            # A local path matches two equivalent MLflow source types; MLflow picks one and warns.
            warnings.simplefilter("ignore", UserWarning)
            dataset = self._mlflow.data.from_numpy(features, source=source, targets=targets, name=name)
        self._mlflow.log_input(dataset, context=context)
        return dataset.digest

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table (one dict per row, same keys) shown in the MLflow UI's artifact and evaluation views."""
        columns = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        self._mlflow.log_table(data=columns, artifact_file=artifact_file)

    def log_model(self, model: Any, *, registered_name: str | None, alias: str, metadata: dict[str, Any]) -> str | None:
        """``mlflow.pytorch.log_model`` under the name ``model``; register it and set ``alias``.

        Returns the registered ``models:/name@alias`` URI, or the run's model URI when not registered.
        """
        import torch

        requirements = [f"torch=={torch.__version__.split('+')[0]}", "monai", f"medsynth=={__version__}"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = self._mlflow.pytorch.log_model(
                model, name="model", registered_model_name=registered_name, pip_requirements=requirements,
                metadata=metadata, await_registration_for=0, serialization_format="pickle",
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

    from medsynth.errors import MedsynthError

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
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst_dir), tracking_uri=store)
    except MlflowException as exc:
        message = " ".join(str(exc.message if hasattr(exc, "message") else exc).split())[:200]
        raise MedsynthError(f"--model-uri {uri}: not found in {store} ({message})") from None
    except OSError as exc:
        raise MedsynthError(f"--model-uri {uri}: no medsynth model file '{artifact}' in that run ({exc.strerror or exc})") from None
    return Path(local)


class NullTracker:
    """Stands in for :class:`Tracker` on ranks > 0 and when tracking is off: records nothing."""

    enabled = False
    run_id = ""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def configure(config: Config) -> None:
    """Point MLflow at the tracking URI and experiment of ``config``."""
    import mlflow

    _quiet_mlflow()
    mlflow.set_tracking_uri(resolve_tracking_uri(config))
    mlflow.set_experiment(config.tracking.experiment)


@contextlib.contextmanager
def start_run(config: Config, *, run_name: str, stage: str | None, nested: bool, config_path: str) -> Iterator[Tracker]:
    """Start an MLflow run; on an exception it ends as FAILED with the error text as a tag.

    The parent run (``stage=None``) and every stage run record the flattened resolved config as
    params, the code version and the git commit as tags.
    """
    import mlflow

    version = code_version()
    tags = {"medsynth.config": config_path, "medsynth.version": version["version"], "medsynth.pipeline": config.name}
    if "git_commit" in version:
        tags["mlflow.source.git.commit"] = version["git_commit"].removesuffix("-dirty")
        tags["medsynth.git_commit"] = version["git_commit"]
    if stage is not None:
        tags["medsynth.stage"] = stage
    run = mlflow.start_run(run_name=run_name, nested=nested, tags=tags)
    tracker = Tracker(run)
    tracker.log_params(flatten(to_plain(config)))
    try:
        yield tracker
    except BaseException as exc:
        text = str(exc) or type(exc).__name__
        mlflow.set_tag("medsynth.error", text[:5000])
        mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run(status="FINISHED")
