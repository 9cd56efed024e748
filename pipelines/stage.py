"""What every stage shares: its context, its cache key, its manifest.

A stage's cache key is the digest of its resolved config sections, the global seed, medsynth's
version and the output digests of the stages it reads. A stage whose key matches the manifest in its
output folder (and whose output files are all still there, with the recorded sizes) is skipped.
Because the key uses upstream *output* digests, a forced rerun that reproduces identical outputs does
not invalidate the stages after it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medsynth import __version__
from medsynth.config import Config, digest, to_plain, to_yaml
from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_write_json, atomic_write_text, file_digest

if TYPE_CHECKING:
    from medsynth.runtime import DistContext
    from medsynth.tracking import Tracker
    from medsynth.training.engine import RunSettings

MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.yaml"


@dataclass
class StageContext:
    """Everything a stage function gets: config, where to write, what to read, where to log."""

    name: str
    config: Config
    config_path: str
    work: Path  # write outputs here; it becomes output_dir/<name> on success (None on ranks > 0 of a sharded stage)
    inputs: dict[str, Path]  # upstream stage name -> its final output folder
    tracker: Tracker  # MlflowTracker on rank 0, NullTracker elsewhere
    dist: DistContext
    summary: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest

    def upstream_manifest(self, stage: str) -> dict[str, Any]:
        return read_manifest(self.inputs[stage])

    def run_settings(self) -> RunSettings:
        """The run settings of this stage's trainer: seed, work folder, process group, metrics to the tracker."""
        from medsynth.training.engine import RunSettings

        return RunSettings(
            seed=self.config.seed,
            work_dir=self.work,
            dist=self.dist,
            log_metrics=self.tracker.log_metrics,
            progress=self.name,
        )


@dataclass(frozen=True)
class StageSpec:
    """A stage: the module whose ``run(ctx)`` runs it, the config sections and upstream stages its
    outputs depend on."""

    name: str
    module: str
    sections: Callable[[Config], dict[str, Any]]
    inputs: tuple[str, ...] | Callable[[Config], tuple[str, ...]]
    description: str
    # training stages: every torchrun rank takes part, and a fixed work folder keeps checkpoints to resume
    trains: bool = False
    # sharded stages: every torchrun rank runs the stage function on its share of the work (batch
    # synthesis / denoising); rank 0 alone gathers, writes and logs (ctx.work is None on other ranks)
    shards: bool = False

    def upstream(self, config: Config) -> tuple[str, ...]:
        """The stages whose outputs this stage reads (for evaluate: whatever of sample / denoise the config runs)."""
        return self.inputs(config) if callable(self.inputs) else self.inputs


def stage_dir(config: Config, name: str) -> Path:
    return Path(config.output_dir) / name


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def upstream_digests(spec: StageSpec, config: Config) -> dict[str, str]:
    """Output digests of the stages ``spec`` reads; a clear error when one has not run yet."""
    digests = {}
    for upstream in spec.upstream(config):
        manifest = read_manifest(stage_dir(config, upstream))
        if "outputs_digest" not in manifest:
            raise MedsynthError(
                f"stage '{spec.name}' needs the outputs of stage '{upstream}' in {stage_dir(config, upstream)}; "
                f"run 'medsynth {upstream}' (or 'medsynth run') with this config first"
            )
        digests[upstream] = manifest["outputs_digest"]
    return digests


def cache_key(spec: StageSpec, config: Config, inputs: dict[str, str]) -> str:
    return digest(
        {
            "stage": spec.name,
            "sections": spec.sections(config),
            "seed": config.seed,
            "version": __version__,
            "inputs": inputs,
        }
    )


def is_fresh(folder: Path, key: str) -> bool:
    """Same key, and every recorded output still present with its recorded size."""
    manifest = read_manifest(folder)
    if manifest.get("cache_key") != key:
        return False
    for rel, info in manifest.get("outputs", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            return False
    return True


def write_manifest(
    ctx: StageContext, key: str, inputs: dict[str, str], code: dict[str, str], started: float
) -> dict[str, Any]:
    """Write the resolved config and the manifest (outputs with digests, inputs, code, seed) into ``work``."""
    atomic_write_text(ctx.work / RESOLVED_CONFIG, to_yaml(ctx.config))
    outputs = {}
    for path in sorted(p for p in ctx.work.rglob("*") if p.is_file()):
        rel = path.relative_to(ctx.work)
        if rel.as_posix() == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        outputs[rel.as_posix()] = {"sha256": file_digest(path), "size": path.stat().st_size}
    manifest = {
        "stage": ctx.name,
        "cache_key": key,
        "config_digest": digest(to_plain(ctx.config)),
        "seed": ctx.config.seed,
        "code": code,
        "inputs": inputs,
        "outputs": outputs,
        "outputs_digest": digest({k: v["sha256"] for k, v in outputs.items()}),
        "mlflow_run_id": ctx.tracker.run_id or None,
        "seconds": round(time.time() - started, 2),
        "summary": ctx.summary,
    }
    atomic_write_json(ctx.work / MANIFEST, manifest)
    return manifest
