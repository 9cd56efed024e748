"""evaluate: synthetic samples against held-out real images.

First version: MMD (MONAI), MS-SSIM diversity of samples vs the real set, per-label-class intensity
distances. Metrics go to MLflow and ``metrics.json``; ``evaluation.png`` shows histograms and values.
New metrics join :func:`medsynth.metrics.fidelity.evaluate_fidelity` without touching this stage.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from medsynth.config import to_plain
from medsynth.data.prepare import load_summary
from medsynth.errors import MedsynthError
from medsynth.figures import evaluation_figure
from medsynth.io.atomic import atomic_write_json
from medsynth.metrics.fidelity import evaluate_fidelity, ssim_settings
from pipelines.stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    config, work, cfg = ctx.config, ctx.work, ctx.config.evaluate
    cache = ctx.inputs["prepare"] / "cache"
    summary = load_summary(cache)
    fake = np.load(ctx.inputs["sample"] / "samples.npy", allow_pickle=False)
    real = np.load(cache / "val_images.npy", allow_pickle=False)[: cfg.num_real]
    labels_path = cache / "val_labels.npy"
    labels = np.load(labels_path, allow_pickle=False)[: cfg.num_real] if labels_path.exists() else None
    if fake.shape[1:] != real.shape[1:]:
        raise MedsynthError(f"{ctx.inputs['sample'] / 'samples.npy'}: samples of shape {fake.shape[1:]} do not match the real images {real.shape[1:]}")
    class_names = {int(k): v for k, v in summary.get("label_names", {}).items()} or None
    metrics = evaluate_fidelity(
        torch.from_numpy(real), torch.from_numpy(fake), spatial_dims=config.data.spatial_dims,
        real_labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)), class_names=class_names,
        bins=cfg.histogram_bins,
    )
    metrics = {f"eval/{k}": float(v) for k, v in metrics.items()}
    details = {"num_real": len(real), "num_fake": len(fake), "ssim_settings": ssim_settings(tuple(real.shape[2:])),
               "labels": labels is not None, "evaluate_config": to_plain(cfg), "metrics": metrics}
    # JSON has no NaN: a class that no synthetic voxel was assigned to is recorded as null.
    atomic_write_json(work / "metrics.json", details | {"metrics": {k: (v if np.isfinite(v) else None) for k, v in metrics.items()}})
    evaluation_figure(real, fake, metrics, work / "evaluation.png")
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_params({"eval.ssim_settings": json.dumps(details["ssim_settings"], default=str)})
    ctx.tracker.log_artifact(work / "evaluation.png")
    ctx.tracker.log_artifact(work / "metrics.json")
    return metrics

