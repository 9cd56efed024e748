"""Order the stages, skip the unchanged ones, run the rest inside MLflow runs.

``medsynth run CONFIG`` opens one parent MLflow run and one nested run per stage that runs;
``medsynth <stage> CONFIG`` runs one stage in a run of its own. A pipeline whose every stage is
unchanged opens no run at all and says so. Under ``torchrun`` every rank takes part in training;
the other stages run on rank 0 while the rest wait.

Crash safety (``kill -9`` at any moment):

- one medsynth command per output folder at a time (:func:`output_folder`: an ``flock`` that dies
  with its process); the next command removes what the killed one's atomic writes left behind;
- a training stage keeps its checkpoints in ``output_dir/.<stage>.partial`` with the cache key it was
  started for; rerunning the same config continues from the last checkpoint by itself (the same
  weights as an uninterrupted run), a changed config starts over;
- while a command runs, ``output_dir/.medsynth-invocation.json`` holds its id, which every MLflow run
  it starts carries as the tag ``medsynth.invocation``. A rerun of the same config after a kill
  continues the parent and stage runs the killed command left RUNNING, and ends those it does not
  need (FINISHED when the stage's outputs are complete, else KILLED): no duplicated runs, none left
  RUNNING. A different config ends them KILLED and starts anew.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from medsynth import __version__
from medsynth.config import Config, differing_keys, digest, result_view
from medsynth.errors import MedsynthError
from medsynth.io.atomic import (
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    remove_stale_temporaries,
    staged_folder,
)
from medsynth.stages import STAGE_NAMES
from pipelines.specs import SPECS
from pipelines.stage import (
    StageContext,
    StageSpec,
    cache_key,
    is_fresh,
    read_manifest,
    stage_dir,
    upstream_digests,
    write_manifest,
)

if TYPE_CHECKING:
    from medsynth.runtime import DistContext


def say(message: str, ctx: DistContext | None = None) -> None:
    """Stage status on stdout (stderr is kept for progress bars and the one-line error); rank 0 only."""
    is_main = ctx.is_main if ctx is not None else os.environ.get("RANK", "0") == "0"
    if is_main:
        print(message, flush=True)


def selected(config: Config, stages: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order."""
    return [s for s in STAGE_NAMES if s in (stages if stages is not None else config.stages)]


def is_current(name: str, config: Config, memo: dict[str, bool] | None = None) -> bool:
    """Whether a stage's outputs match this config: its own cache key, and every upstream's too."""
    memo = {} if memo is None else memo
    if name not in memo:
        spec = SPECS[name]
        try:
            key = cache_key(spec, config, upstream_digests(spec, config))
        except MedsynthError:  # an upstream that has not run yet
            memo[name] = False
        else:
            memo[name] = is_fresh(stage_dir(config, name), key) and all(
                is_current(u, config, memo) for u in spec.upstream(config)
            )
    return memo[name]


def plan(config: Config, names: list[str], force: bool) -> list[tuple[str, bool]]:
    """(stage, fresh) for each stage, assuming the earlier ones keep their outputs."""
    memo: dict[str, bool] = {}
    return [(name, not force and is_current(name, config, memo)) for name in names]


INVOCATION_RECORD = ".medsynth-invocation.json"  # the running command's id and MLflow store, in output_dir
# In a training work folder: the cache key (and its parts) its checkpoints were made for.
STAGE_KEY = ".medsynth-stage-key"


def training_work(config: Config, name: str) -> Path:
    """The fixed work folder of a training stage: its checkpoints survive a crash there."""
    return Path(config.output_dir) / f".{name}.partial"


@contextlib.contextmanager
def output_folder(config: Config) -> Iterator[None]:
    """Hold ``config.output_dir`` for one medsynth command, and tidy what a killed one left behind.

    Raises:
        MedsynthError: another medsynth process is using the folder (named by its pid).
    """
    with folder_lock(config.output_dir):
        keep = {training_work(config, name).name for name, spec in SPECS.items() if spec.trains}
        remove_stale_temporaries(config.output_dir, keep=keep)
        yield


def report_if_unchanged(config: Config, stages: list[str] | None, force: bool) -> bool:
    """When every selected stage is unchanged, say so and return True.

    Needs neither torch nor MLflow, so a fully cached pipeline answers in about a second. Not taken
    after a killed command (its MLflow runs are still to be closed).
    """
    names = selected(config, stages)
    if (
        force
        or (Path(config.output_dir) / INVOCATION_RECORD).exists()
        or not all(fresh for _, fresh in plan(config, names, force))
    ):
        return False
    for name in names:
        say(f"{name}: unchanged, skipped ({stage_dir(config, name)})")
    return True


def run_pipeline(
    config: Config,
    config_path: str,
    ctx: DistContext,
    *,
    stages: list[str] | None = None,
    force: bool = False,
    nested: bool = True,
) -> dict[str, dict]:
    """Run ``stages`` (default: the config's) in pipeline order.

    Args:
        config: the resolved config.
        config_path: the YAML file it came from (recorded in runs and outputs).
        ctx: the process group (rank 0 alone logs and writes).
        stages: the stages to run; ``None`` means ``config.stages``.
        force: rerun stages even when their cache key is unchanged.
        nested: one parent run with nested stage runs (``medsynth run``); otherwise one run per stage.

    Returns:
        The manifest of every stage, run or skipped.
    """
    if report_if_unchanged(config, stages, force):
        return {}
    names = selected(config, stages)
    # Inputs outside the pipeline (a stage module's optional preflight(config)) are checked before any stage runs.
    for name in names:
        preflight = getattr(importlib.import_module(SPECS[name].module), "preflight", None)
        if preflight is not None:
            preflight(config)
    # An interrupted training that cannot continue is refused before any MLflow run starts.
    for name in names:
        if SPECS[name].trains and not force:
            check_interrupted(SPECS[name], config)

    from medsynth import tracking

    results: dict[str, dict] = {}
    invocation = None
    if ctx.is_main:
        tracking.configure(config)  # a store that does not answer stops here, before anything is written
        invocation = Invocation(config, nested, tracking)
        invocation.begin()
    if not force and all(fresh for _, fresh in plan(config, names, force)):
        # Only here after a killed command whose stages had all finished: close its runs, start none.
        if invocation is not None:
            invocation.finish()
        for name in names:
            say(f"{name}: unchanged, skipped ({stage_dir(config, name)})", ctx)
        return {}
    try:
        parent = (
            tracking.start_run(
                config,
                run_name=config.name,
                stage=None,
                nested=False,
                config_path=config_path,
                invocation=invocation.id,
                continue_run=invocation.take(None),
            )
            if invocation is not None and nested
            else _null_context()
        )
        with parent as parent_tracker:
            for name in names:
                results[name] = _run_stage(
                    SPECS[name],
                    config,
                    config_path,
                    ctx,
                    force=force,
                    nested=nested,
                    tracking=tracking,
                    invocation=invocation,
                )
            if parent_tracker is not None:
                parent_tracker.set_tags({"medsynth.stages": ",".join(names)})
    finally:
        if invocation is not None:
            invocation.finish()
    return results


class Invocation:
    """The MLflow runs of one medsynth command, traceable after a ``kill -9`` through a hidden record in the output
    folder.

    :meth:`begin` takes over what a killed command with the same config left (its id, and its RUNNING
    parent and stage runs, to be continued) or ends its runs KILLED when the config differs, then
    records this command. :meth:`finish` ends the killed command's runs that were not continued and
    removes the record (kept when the store failed during this command, so that the next one closes
    this one's runs).
    """

    def __init__(self, config: Config, nested: bool, tracking) -> None:
        self.config, self.tracking = config, tracking
        self.path = Path(config.output_dir) / INVOCATION_RECORD
        # the keys that change results: a rerun that only turns a knob (resume, memory, cadence) is the same command
        self.signature = {
            "config_digest": digest(result_view(config)),
            "tracking_uri": tracking.resolve_tracking_uri(config),
            "experiment": config.tracking.experiment,
            "nested": nested,
        }
        self.id = uuid.uuid4().hex
        self.parent: str | None = None  # a RUNNING parent run to continue
        self.stages: dict[str, str] = {}  # stage -> its RUNNING run, to continue when the stage runs

    def begin(self) -> None:
        left = _read_json(self.path)
        if left.get("id"):
            same = all(left.get(key) == value for key, value in self.signature.items())
            if same:
                self._take_over(left)
            else:
                self._end_foreign(left)
        atomic_write_json(self.path, self.signature | {"id": self.id, "pid": os.getpid(), "started": time.time()})

    def _take_over(self, left: dict) -> None:
        self.id = left["id"]
        for run in self.tracking.invocation_runs(self.config.tracking.experiment, self.id) or []:
            if run.info.status != "RUNNING":
                continue
            stage = run.data.tags.get("medsynth.stage")
            if stage is None:
                self.parent = run.info.run_id
            else:
                self.stages[stage] = run.info.run_id
        if self.parent or self.stages:
            say(
                "note: continuing the MLflow runs left open by an interrupted medsynth command "
                f"(pid {left.get('pid')}) in {self.signature['tracking_uri']}"
            )

    def _end_foreign(self, left: dict) -> None:
        """A killed command with another config (or store): its open runs end KILLED, wherever they are."""
        note = (
            f"ended by a later medsynth command (pid {os.getpid()}) with another config: "
            "the process that ran it was killed"
        )
        uri = str(left.get("tracking_uri", ""))
        failed = (
            self.tracking.end_killed_runs(uri, str(left.get("experiment", "")), str(left["id"]), note)
            if uri
            else "no store recorded"
        )
        if failed:
            say(
                f"note: the MLflow runs of an interrupted medsynth command (pid {left.get('pid')}) "
                f"stay RUNNING in {uri or '?'} ({failed})"
            )

    def take(self, stage: str | None) -> str | None:
        """The RUNNING run a killed command left for ``stage`` (``None``: the parent run), to be continued
        now; None: start a new one."""
        if stage is None:
            parent, self.parent = self.parent, None
            return parent
        return self.stages.pop(stage, None)

    def finish(self) -> None:
        note = "ended by a later medsynth command after its process was killed"
        for stage, run_id in self.stages.items():
            complete = read_manifest(stage_dir(self.config, stage)).get("mlflow_run_id") == run_id
            self.tracking.close_run(
                run_id,
                "FINISHED" if complete else "KILLED",
                note + ("; the stage's outputs are complete" if complete else "; the stage did not finish"),
            )
        if self.parent is not None:  # not continued: every stage of the pipeline was complete already
            self.tracking.close_run(self.parent, "FINISHED", note + "; its stages' outputs are complete")
        self.stages.clear()
        self.parent = None
        if not self.tracking.tracking_lost():
            self.path.unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def check_upstream_current(spec: StageSpec, config: Config) -> None:
    """Refuse to build on outputs that an earlier stage made from a different config."""
    for upstream in spec.upstream(config):
        if not is_current(upstream, config):
            raise MedsynthError(
                f"the outputs of stage '{upstream}' in {stage_dir(config, upstream)} were made with another config; "
                f"run 'medsynth {upstream}' (or 'medsynth run') with this config first"
            )


def _run_stage(
    spec: StageSpec,
    config: Config,
    config_path: str,
    ctx: DistContext,
    *,
    force: bool,
    nested: bool,
    tracking,
    invocation: Invocation | None = None,
) -> dict:
    from medsynth.runtime import barrier, from_main

    run_fn = importlib.import_module(spec.module).run
    inputs = upstream_digests(spec, config)
    check_upstream_current(spec, config)
    key = cache_key(spec, config, inputs)
    final = stage_dir(config, spec.name)
    # Rank 0 decides: another rank reading the folder while rank 0 writes it could skip a stage rank 0 runs.
    if from_main(not force and is_fresh(final, key), ctx):
        say(f"{spec.name}: unchanged, skipped ({final})", ctx)
        return {}
    distributed_stage = spec.trains
    if not ctx.is_main and not distributed_stage:
        if spec.shards and ctx.distributed:
            # this rank computes its share; rank 0 gathers and writes (no folder, no tracker here)
            run_fn(
                StageContext(
                    spec.name,
                    config,
                    config_path,
                    None,
                    {u: stage_dir(config, u) for u in spec.upstream(config)},
                    tracking.NullTracker(),
                    ctx,
                )
            )
        barrier(ctx)
        return {}
    say(f"{spec.name}: running -> {final}", ctx)
    started = time.time()
    # Training keeps a fixed work folder with its checkpoints so that an interrupted run can resume.
    work = training_work(config, spec.name) if distributed_stage else None
    stage_config, recorded = (
        _resume_if_interrupted(spec, config, work, key, key_parts(spec, config, inputs), ctx, force=force)
        if distributed_stage
        else (config, None)
    )
    run = (
        tracking.start_run(
            config,
            run_name=f"{config.name}/{spec.name}",
            stage=spec.name,
            nested=nested,
            config_path=config_path,
            invocation=invocation.id if invocation is not None else None,
            continue_run=invocation.take(spec.name) if invocation is not None else None,
        )
        if ctx.is_main
        else _null_context()
    )
    manifest: dict = {}
    try:
        with run as tracker:
            tracker = tracker if tracker is not None else tracking.NullTracker()
            if ctx.is_main:
                with staged_folder(final, work=work, keep_on_error=distributed_stage) as folder:
                    stage_ctx = StageContext(
                        spec.name,
                        stage_config,
                        config_path,
                        folder,
                        {u: stage_dir(config, u) for u in spec.upstream(config)},
                        tracker,
                        ctx,
                    )
                    stage_ctx.summary = run_fn(stage_ctx) or {}
                    manifest = write_manifest(stage_ctx, key, inputs, tracking.code_version(), started)
                    tracker.log_artifact(folder / "config.yaml")
                    tracker.log_artifact(folder / "manifest.json")
            else:
                stage_ctx = StageContext(
                    spec.name,
                    stage_config,
                    config_path,
                    work,
                    {u: stage_dir(config, u) for u in spec.upstream(config)},
                    tracker,
                    ctx,
                )
                run_fn(stage_ctx)
    except BaseException as exc:
        # Nothing half-written: a training work folder survives only if it holds a checkpoint to resume.
        if distributed_stage and ctx.is_main and work is not None and not (work / "checkpoints" / "last.pt").is_file():
            shutil.rmtree(work, ignore_errors=True)
        elif distributed_stage and ctx.is_main and work is not None and isinstance(exc, Exception):
            # A refused or failed run leaves the folder's stage key as it found it
            # (Ctrl-C keeps this run's, to continue).
            if recorded is None:
                (work / STAGE_KEY).unlink(missing_ok=True)
            else:
                atomic_write_text(work / STAGE_KEY, recorded)
        raise
    barrier(ctx)
    say(f"{spec.name}: done in {time.time() - started:.1f}s", ctx)
    return manifest


def key_parts(spec: StageSpec, config: Config, inputs: dict[str, str]) -> dict:
    """What a stage's cache key digests, by part: its config keys that change results, the seed, its inputs."""
    return {**spec.sections(config), "seed": config.seed, "medsynth_version": __version__, "inputs": inputs}


def _read_stage_key(work: Path) -> tuple[str | None, dict | None]:
    """The cache key (and its parts) a training work folder's checkpoints were made for; (None, None): unknown."""
    record = _read_json(work / STAGE_KEY)
    return (record.get("key"), record.get("parts")) if isinstance(record.get("key"), str) else (None, None)


def _interrupted_elsewhere(spec: StageSpec, work: Path, old: dict | None, new: dict) -> MedsynthError:
    keys = differing_keys(old, new) if isinstance(old, dict) else []
    inputs = [k.removeprefix("inputs.") for k in keys if k.startswith("inputs.")]
    named = [k for k in keys if not k.startswith("inputs.")]
    what = []
    if named:
        what.append(f"other values of {', '.join(named[:6])}{' ...' if len(named) > 6 else ''}")
    if inputs:
        what.append(f"other outputs of stage {', '.join(inputs)}")
    return MedsynthError(
        f"{spec.name}: the interrupted run in {work} was made with {' and '.join(what) or 'another config'}, "
        "which change the result, so it cannot continue; rerun with --force to start over (or restore the old values)"
    )


def _refuse_other_checkpoint(spec: StageSpec, config: Config, work: Path, key: str, parts: dict) -> bool:
    """Whether the work folder holds the checkpoint of an interrupted run of this very stage config (same cache
    key); raises the one-line refusal when it holds one made with other result keys (an explicit
    ``<stage>.resume`` leaves that to the trainer's own identity check)."""
    recorded_key, recorded_parts = _read_stage_key(work)
    if recorded_key is None or not (work / "checkpoints" / "last.pt").is_file():
        return False
    if recorded_key != key and not getattr(config, spec.name).resume:
        raise _interrupted_elsewhere(spec, work, recorded_parts, parts)
    return recorded_key == key


def check_interrupted(spec: StageSpec, config: Config) -> None:
    """Refuse now, before any MLflow run, when the stage's work folder holds the checkpoint of an interrupted
    run made with other result keys; nothing to say when the stage's inputs are not made yet."""
    try:
        inputs = upstream_digests(spec, config)
    except MedsynthError:
        return
    work = training_work(config, spec.name)
    _refuse_other_checkpoint(spec, config, work, cache_key(spec, config, inputs), key_parts(spec, config, inputs))


def _resume_if_interrupted(
    spec: StageSpec, config: Config, work: Path, key: str, parts: dict, ctx: DistContext, *, force: bool = False
) -> tuple[Config, str | None]:
    """The config a training stage runs with: ``<stage>.resume`` turned on when its work folder holds the
    checkpoint of an interrupted run of this very stage config (same cache key: only keys that change results
    count, so a changed memory or speed knob still continues), so that rerunning the command after a crash
    continues where the checkpoint stands. A checkpoint made with other result keys is refused with one line
    naming them; ``force`` clears it and starts over. An explicit ``resume=true`` is left to the trainer's own
    identity check. Every rank decides on the same files before rank 0 changes them.

    Returns:
        The config, and the stage key record the work folder held before (None: none).

    Raises:
        MedsynthError: the work folder holds a checkpoint of another stage config (without ``force``).
    """
    from medsynth.runtime import barrier

    section = getattr(config, spec.name)  # training stages are configured by the section of their name
    checkpoint = work / "checkpoints" / "last.pt"
    recorded = (work / STAGE_KEY).read_text(encoding="utf-8") if (work / STAGE_KEY).is_file() else None
    resume = section.resume or (not force and _refuse_other_checkpoint(spec, config, work, key, parts))
    barrier(ctx)
    if ctx.is_main:
        if resume and not section.resume:
            say(
                f"{spec.name}: continuing an interrupted run of this config from its last checkpoint ({checkpoint})",
                ctx,
            )
        if not resume and work.exists():
            shutil.rmtree(work)
        atomic_write_json(work / STAGE_KEY, {"key": key, "parts": parts})
    barrier(ctx)
    if resume and not section.resume:
        return config.model_copy(update={spec.name: section.model_copy(update={"resume": True})}), recorded
    return config, recorded
