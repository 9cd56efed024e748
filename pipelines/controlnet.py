"""controlnet: a MONAI ControlNet trained on top of the trained (frozen) diffusion model, so that a
label map becomes an image whose tissues sit where the map says.

Runs under ``torchrun`` like ``train``. Reads the prepare stage's cached images and their label maps
(phantoms have them; your own data needs label maps) and the train stage's ``model.pt``. Outputs
(``output_dir/controlnet/``): ``controlnet.pt`` (EMA weights, the number of labels, the digest of
the base model it belongs to), ``checkpoints/last.pt`` (``controlnet.resume=true`` continues it),
``history.json``, ``loss_curve.png``.
"""

from __future__ import annotations

from typing import Any

from medsynth.data.prepare import load_split, load_summary
from medsynth.errors import MedsynthError
from medsynth.figures import loss_curve
from medsynth.io.atomic import atomic_write_json, file_digest
from medsynth.models.loading import load_trained_model
from medsynth.training.controlnet import train_controlnet
from pipelines.stage import StageContext


def num_labels(summary: dict, *label_arrays) -> int:
    """Label values run 0..K-1: from the prepare summary's label names, or the largest value seen."""
    names = [int(k) for k in summary.get("label_names", {})]
    seen = [int(a.max()) for a in label_arrays if a is not None and a.size]
    return max(names + seen) + 1


def run(ctx: StageContext) -> dict[str, Any]:
    config, work = ctx.config, ctx.work
    cache = ctx.inputs["prepare"] / "cache"
    summary = load_summary(cache)
    train, val = load_split(cache, "train"), load_split(cache, "val")
    if train["labels"] is None or val["labels"] is None:
        raise MedsynthError(
            f"{cache}: the prepared data has no label maps; the controlnet stage needs images with label maps "
            "(phantoms have them)"
        )
    model_path = ctx.inputs["train"] / "model.pt"
    base = load_trained_model(model_path, ctx.dist.device)
    labels = num_labels(summary, train["labels"], val["labels"])
    result = train_controlnet(
        config.controlnet,
        base,
        train["images"],
        train["labels"],
        val["images"],
        val["labels"],
        ctx.run_settings(),
        num_labels=labels,
        base_sha256=file_digest(model_path),
    )
    if not ctx.dist.is_main:
        return {}
    atomic_write_json(work / "history.json", result.history)
    loss_curve(result.history, work / "loss_curve.png")
    ctx.tracker.log_artifact(work / "loss_curve.png")
    last = result.history[-1] if result.history else {}
    return {
        "steps": result.steps,
        "num_labels": labels,
        "final_loss": last.get("train/loss"),
        "val_loss": last.get("val/loss"),
        "resumed_from": result.resumed_from,
        "mlflow_run_id": ctx.tracker.run_id or None,
    }
