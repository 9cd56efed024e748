"""The ``medsynth`` command: run a pipeline, or one stage of it, from a YAML config.

    medsynth run CONFIG [key.sub=value ...] [--stages a,b] [--force]
    medsynth prepare|autoencoder|train|controlnet|sample|evaluate|augment CONFIG [key.sub=value ...] [--force]
    medsynth denoise INPUT OUTPUT [--checkpoint PATH | --model-uri URI] [--method M] [--sigma auto|VALUE]
        [--modality mr|ct]

(The pipeline's ``denoise`` stage runs with ``medsynth run CONFIG --stages denoise``; ``medsynth
denoise`` itself denoises one NIfTI file or DICOM series folder.)

Errors the user can fix print one line (``error: ...``) and exit with code 2. One command at a time
per output folder (a second one is refused); rerunning a command after a crash continues it
(training from its last checkpoint, the same MLflow runs).
Distributed training: ``torchrun --nproc_per_node=2 -m medsynth train CONFIG``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from medsynth import __version__
from medsynth.denoise.registry import DENOISE_METHOD_NAMES, DENOISE_METHODS, PRIOR_MODE_NAMES, PRIOR_MODES
from medsynth.errors import MedsynthError
from medsynth.stages import BY_NAME, STAGE_NAMES


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line error convention of the rest of the CLI (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def _sigma(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise MedsynthError(f"--sigma: expected 'auto' or a number >= 0, got '{text}'") from None
    if not (value >= 0 and value != float("inf")):
        raise MedsynthError(f"--sigma: expected 'auto' or a number >= 0, got {text}")
    return value


def add_denoise_parser(commands) -> None:
    sub = commands.add_parser(
        "denoise",
        help="denoise a NIfTI file or a DICOM series folder (diffusion prior or a classical baseline)",
        description="Denoise one scan: a NIfTI file (-> NIfTI with the same header) or a folder holding one "
        "DICOM series (-> a derived DICOM series). The diffusion method needs a trained model.",
    )
    sub.add_argument("input", help="a .nii/.nii.gz file or a folder with one DICOM series")
    sub.add_argument("output", help="a .nii/.nii.gz path (NIfTI input) or a new folder (DICOM input)")
    model = sub.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", metavar="PATH", help="a medsynth model file (train/model.pt)")
    model.add_argument(
        "--model-uri",
        metavar="URI",
        help="an MLflow model: models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>",
    )
    sub.add_argument(
        "--method",
        default="diffusion",
        choices=DENOISE_METHOD_NAMES,
        help="; ".join(f"{name}: {method.description}" for name, method in DENOISE_METHODS.items()),
    )
    sub.add_argument(
        "--sigma", default="auto", help="noise std in the scan's units (HU for CT), or 'auto' to estimate it (default)"
    )
    sub.add_argument("--modality", choices=["mr", "ct"], help="default: from DICOM, else from the model")
    sub.add_argument(
        "--mode",
        default="tweedie",
        choices=PRIOR_MODE_NAMES,
        help="diffusion prior: " + "; ".join(f"{name}: {mode.description}" for name, mode in PRIOR_MODES.items()),
    )
    sub.add_argument("--steps", type=int, default=10, help="reverse steps for ddim/ancestral (default 10)")
    sub.add_argument(
        "--samples", type=int, default=1, help="posterior draws averaged (ancestral); >1 also writes an uncertainty map"
    )
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="sliding-window overlap for scans larger than the model (default 0.5)",
    )
    sub.add_argument(
        "--ensemble",
        action="store_true",
        help="diffusion priors: average over the scan's mirror images (and 90-degree turns where the prior was "
        "trained on turned crops); 4-8x the time",
    )
    sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sub.add_argument(
        "--tracking-uri", help="MLflow store for --model-uri (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ss = sub.add_argument_group("self-supervised (no clean scans: a prior fitted on the noisy scans themselves)")
    ss.add_argument(
        "--self-supervised",
        action="store_true",
        help="fit a diffusion prior on INPUT's own noisy voxels (or --train-folder's) and denoise INPUT with it; "
        "same as --method self_supervised. With --checkpoint: reuse a prior fitted so (OUTPUT_prior.pt)",
    )
    ss.add_argument("--train-folder", metavar="DIR", help="noisy scans of the same protocol to fit the prior on")
    ss.add_argument(
        "--config", metavar="PATH", help="the fitting recipe (default: configs/denoise_self_supervised.yaml)"
    )
    ss.add_argument("--alpha", type=float, default=1.0, help="added noise / the scan's noise (default 1.0)")
    ss.add_argument("--draws", type=int, default=8, help="estimates averaged (default 8)")


def run_denoise(args: argparse.Namespace) -> int:
    from medsynth.denoise.files import denoise_path
    from medsynth.denoise.scan import PriorSettings

    if args.steps < 1 or args.samples < 1:
        raise MedsynthError(f"--steps and --samples must be >= 1, got {args.steps} and {args.samples}")
    if args.samples > 1 and not PRIOR_MODES[args.mode].stochastic:
        raise MedsynthError(f"--samples {args.samples} needs --mode ancestral (mode '{args.mode}' is deterministic)")
    if not 0 <= args.overlap < 1:
        raise MedsynthError(f"--overlap must be in [0, 1), got {args.overlap}")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MedsynthError("--device cuda: no CUDA device here")
    if args.self_supervised or args.method == "self_supervised":
        return _run_self_supervised(args, device)
    if args.train_folder or args.config:
        raise MedsynthError("--train-folder and --config belong to --self-supervised")
    settings = PriorSettings(
        mode=args.mode,
        steps=args.steps,
        samples=args.samples,
        seed=args.seed,
        overlap=args.overlap,
        ensemble=args.ensemble,
    )
    record = denoise_path(
        args.input,
        args.output,
        method=args.method,
        sigma=_sigma(args.sigma),
        modality=args.modality,
        checkpoint=args.checkpoint,
        model_uri=args.model_uri,
        tracking_uri=args.tracking_uri,
        settings=settings,
        device=device,
        overwrite=args.overwrite,
    )
    info = record["denoise"]
    print(
        f"denoise: {info['method']}, sigma {info['sigma']:.4g} ({info['sigma_source']}) -> {record['output']}",
        flush=True,
    )
    if info.get("warning"):
        print(f"note: {info['warning']}", file=sys.stderr)
    return 0


def _run_self_supervised(args: argparse.Namespace, device: str) -> int:
    from medsynth.self_supervised import self_supervised_path

    if args.method not in ("diffusion", "self_supervised"):
        raise MedsynthError(f"--self-supervised fits its own prior; it does not go with --method {args.method}")
    if args.model_uri:
        raise MedsynthError("--self-supervised takes a fitted prior as --checkpoint PATH, not --model-uri")
    if not (0 < args.alpha <= 4) or args.draws < 1:
        raise MedsynthError(f"--alpha must be in (0, 4] and --draws >= 1, got {args.alpha} and {args.draws}")
    record = self_supervised_path(
        args.input,
        args.output,
        train_folder=args.train_folder,
        checkpoint=args.checkpoint,
        config_path=args.config,
        sigma=_sigma(args.sigma),
        modality=args.modality,
        alpha=args.alpha,
        draws=args.draws,
        seed=args.seed,
        ensemble=args.ensemble,
        device=device,
        overwrite=args.overwrite,
    )
    info = record["denoise"]
    print(
        f"denoise: self-supervised (prior fitted on the {info['prior_fitted_on']}), sigma {info['sigma']:.4g} "
        f"({info['sigma_source']}) -> {record['output']}",
        flush=True,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="medsynth",
        description="Train MONAI diffusion models on medical scans, sample, evaluate and augment, tracked in MLflow.",
        epilog="Overrides: key.sub=value after the config, e.g. train.max_steps=200 data.phantom.count=50. "
        "MLflow: runs go to $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; browse them with "
        "'mlflow ui --backend-store-uri sqlite:///mlflow.db'; a team server: docs/team_setup.md.",
    )
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", help="YAML config file (see configs/)")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        sub.add_argument("--force", action="store_true", help="rerun even when config and inputs are unchanged")

    run = commands.add_parser(
        "run",
        help="run the stages the config lists (unchanged ones are skipped)",
        description="Run the pipeline: "
        + " -> ".join(STAGE_NAMES)
        + ". One parent MLflow run, one nested run per stage.",
    )
    add_common(run)
    run.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGE_NAMES)}")
    for stage in STAGE_NAMES:
        if stage == "denoise":
            add_denoise_parser(commands)
            continue
        text = BY_NAME[stage].help
        add_common(commands.add_parser(stage, help=text, description=text[0].upper() + text[1:] + "."))
    return parser


def _stages(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGE_NAMES]
    if unknown or not names:
        raise MedsynthError(
            f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'} (allowed: {', '.join(STAGE_NAMES)})"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "1")
    try:
        if args.command == "denoise":
            return run_denoise(args)
        from medsynth.config import check_paths, load_config

        config = load_config(args.config, args.overrides)
        check_paths(config, args.config)
        stages = _stages(args.stages) if args.command == "run" else [args.command]

        from pipelines.runner import output_folder, report_if_unchanged, run_pipeline

        # One medsynth command per output folder; under torchrun rank 0 holds it for all ranks.
        with output_folder(config) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
            if report_if_unchanged(config, stages, args.force):
                return 0
            from medsynth.runtime import setup, teardown

            ctx = setup(config.device)
            try:
                run_pipeline(config, args.config, ctx, stages=stages, force=args.force, nested=args.command == "run")
            finally:
                teardown()
    except MedsynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted (training keeps its last checkpoint; rerun the same command to continue from it)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
