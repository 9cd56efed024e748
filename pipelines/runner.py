"""Order the stages, skip the unchanged ones, run the rest inside MLflow runs.

``medsynth run CONFIG`` opens one parent MLflow run and one nested run per stage that runs;
``medsynth <stage> CONFIG`` runs one stage in a run of its own. A pipeline whose every stage is
unchanged opens no run at all and says so. Under ``torchrun`` every rank takes part in training;
the other stages run on rank 0 while the rest wait.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medsynth.config import STAGES, Config
from medsynth.errors import MedsynthError
from medsynth.io.atomic import staged_folder
from pipelines.specs import SPECS
from pipelines.stage import StageContext, StageSpec, cache_key, is_fresh, stage_dir, upstream_digests, write_manifest

if TYPE_CHECKING:
    from medsynth.training.distributed import DistContext


def say(message: str, ctx: DistContext | None = None) -> None:
    """Stage status on stdout (stderr is kept for progress bars and the one-line error); rank 0 only."""
    is_main = ctx.is_main if ctx is not None else os.environ.get("RANK", "0") == "0"
    if is_main:
        print(message, flush=True)


def selected(config: Config, stages: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order."""
    return [s for s in STAGES if s in (stages if stages is not None else config.stages)]


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
            memo[name] = is_fresh(stage_dir(config, name), key) and all(is_current(u, config, memo) for u in spec.upstream(config))
    return memo[name]


def plan(config: Config, names: list[str], force: bool) -> list[tuple[str, bool]]:
    """(stage, fresh) for each stage, assuming the earlier ones keep their outputs."""
    memo: dict[str, bool] = {}
    return [(name, not force and is_current(name, config, memo)) for name in names]


def report_if_unchanged(config: Config, stages: list[str] | None, force: bool) -> bool:
    """When every selected stage is unchanged, say so and return True.

    Needs neither torch nor MLflow, so a fully cached pipeline answers in about a second.
    """
    names = selected(config, stages)
    if force or not all(fresh for _, fresh in plan(config, names, force)):
        return False
    for name in names:
        say(f"{name}: unchanged, skipped ({stage_dir(config, name)})")
    return True


def run_pipeline(config: Config, config_path: str, ctx: DistContext, *, stages: list[str] | None = None, force: bool = False, nested: bool = True) -> dict[str, dict]:
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

    from medsynth import tracking

    results: dict[str, dict] = {}
    if ctx.is_main:
        tracking.configure(config)
    parent = (
        tracking.start_run(config, run_name=config.name, stage=None, nested=False, config_path=config_path)
        if nested and ctx.is_main
        else _null_context()
    )
    with parent as parent_tracker:
        for name in names:
            results[name] = _run_stage(SPECS[name], config, config_path, ctx, force=force, nested=nested, tracking=tracking)
        if parent_tracker is not None and ctx.is_main:
            parent_tracker.set_tags({"medsynth.stages": ",".join(names)})
    return results


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


def _run_stage(spec: StageSpec, config: Config, config_path: str, ctx: DistContext, *, force: bool, nested: bool, tracking) -> dict:
    from medsynth.training.distributed import barrier

    run_fn = importlib.import_module(spec.module).run
    inputs = upstream_digests(spec, config)
    check_upstream_current(spec, config)
    key = cache_key(spec, config, inputs)
    final = stage_dir(config, spec.name)
    if not force and is_fresh(final, key):
        say(f"{spec.name}: unchanged, skipped ({final})", ctx)
        return {}
    distributed_stage = spec.trains
    if not ctx.is_main and not distributed_stage:
        if spec.shards and ctx.distributed:
            # this rank computes its share; rank 0 gathers and writes (no folder, no tracker here)
            run_fn(StageContext(spec.name, config, config_path, None, {u: stage_dir(config, u) for u in spec.upstream(config)},
                                tracking.NullTracker(), ctx))
        barrier(ctx)
        return {}
    say(f"{spec.name}: running -> {final}", ctx)
    started = time.time()
    # Training keeps a fixed work folder with its checkpoints so that an interrupted run can resume.
    work = Path(config.output_dir) / f".{spec.name}.partial" if distributed_stage else None
    run = (
        tracking.start_run(config, run_name=f"{config.name}/{spec.name}", stage=spec.name, nested=nested, config_path=config_path)
        if ctx.is_main
        else _null_context()
    )
    manifest: dict = {}
    try:
        with run as tracker:
            tracker = tracker if tracker is not None else tracking.NullTracker()
            if ctx.is_main:
                with staged_folder(final, work=work, keep_on_error=distributed_stage) as folder:
                    stage_ctx = StageContext(spec.name, config, config_path, folder, {u: stage_dir(config, u) for u in spec.upstream(config)}, tracker, ctx)
                    stage_ctx.summary = run_fn(stage_ctx) or {}
                    manifest = write_manifest(stage_ctx, key, inputs, tracking.code_version(), started)
                    tracker.log_artifact(folder / "config.yaml")
                    tracker.log_artifact(folder / "manifest.json")
            else:
                stage_ctx = StageContext(spec.name, config, config_path, work, {u: stage_dir(config, u) for u in spec.upstream(config)}, tracker, ctx)
                run_fn(stage_ctx)
    except BaseException:
        # Nothing half-written: a training work folder survives only if it holds a checkpoint to resume.
        if distributed_stage and ctx.is_main and work is not None and not (work / "checkpoints" / "last.pt").is_file():
            shutil.rmtree(work, ignore_errors=True)
        raise
    barrier(ctx)
    say(f"{spec.name}: done in {time.time() - started:.1f}s", ctx)
    return manifest
