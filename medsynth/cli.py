"""The ``medsynth`` command: run a pipeline, or one stage of it, from a YAML config.

    medsynth run CONFIG [key.sub=value ...] [--stages a,b] [--force]
    medsynth prepare|train|sample|evaluate|augment CONFIG [key.sub=value ...] [--force]

Errors the user can fix print one line (``error: ...``) and exit with code 2.
Distributed training: ``torchrun --nproc_per_node=2 -m medsynth train CONFIG``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from medsynth import __version__
from medsynth.config import STAGES
from medsynth.errors import MedsynthError

STAGE_HELP = {
    "prepare": "phantoms or your NIfTI/DICOM folder -> datalist.json + cached model inputs",
    "train": "train the diffusion model (checkpoints, EMA, MLflow model); works under torchrun",
    "sample": "draw synthetic scans (NIfTI + grid.png) with DDPM, DDIM or RFlow",
    "evaluate": "compare samples with held-out real images (MMD, diversity, per-class intensities)",
    "augment": "write synthetic training cases with provenance and a merged datalist",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medsynth",
        description="Train MONAI diffusion models on medical scans, sample, evaluate and augment, tracked in MLflow.",
        epilog="Overrides: key.sub=value after the config, e.g. train.max_steps=200 data.phantom.count=50. "
        "MLflow: runs go to $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; browse them with "
        "'mlflow ui --backend-store-uri sqlite:///mlflow.db'.",
    )
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", help="YAML config file (see configs/)")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        sub.add_argument("--force", action="store_true", help="rerun even when config and inputs are unchanged")

    run = commands.add_parser("run", help="run the stages the config lists (unchanged ones are skipped)",
                              description="Run the pipeline: " + " -> ".join(STAGES) + ". One parent MLflow run, one nested run per stage.")
    add_common(run)
    run.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    for stage in STAGES:
        add_common(commands.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage].capitalize() + "."))
    return parser


def _stages(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise MedsynthError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'} (allowed: {', '.join(STAGES)})")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    try:
        from medsynth.config import check_paths, load_config

        config = load_config(args.config, args.overrides)
        check_paths(config, args.config)
        stages = _stages(args.stages) if args.command == "run" else [args.command]

        from pipelines.runner import report_if_unchanged, run_pipeline

        if report_if_unchanged(config, stages, args.force):
            return 0
        from medsynth.training.distributed import setup, teardown

        ctx = setup(config.device)
        try:
            run_pipeline(config, args.config, ctx, stages=stages, force=args.force, nested=args.command == "run")
        finally:
            teardown()
    except MedsynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (training keeps its last checkpoint; rerun with train.resume=true to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
