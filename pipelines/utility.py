"""utility: do the synthetic cases help a downstream model?

A small MONAI model (:mod:`medsynth.training.utility`) is trained on (a) the real training images,
(b) the real images plus synthetic ones at ``augment.ratio`` synthetic per real image, (c) the
synthetic images alone, once per seed in ``utility.seeds``, with the same steps and batch size
everywhere, and scored on the held-out real images. The task is classification on the class labels
(class-conditional models) or segmentation on the label maps the synthetic images were generated
from (the ControlNet path); ``utility.task: auto`` picks segmentation when there are label maps.

Outputs (``output_dir/utility/``): ``utility.json`` (settings, per-seed results, mean ± std),
``utility.png`` (bar chart with every seed's value), and in MLflow the table ``utility_table.json``
and the metrics ``utility/<regime>/<metric>_mean|_std`` and ``utility/gain/<metric>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsynth.data.prepare import load_split
from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_write_json
from pipelines.stage import StageContext


def _load(path, what: str) -> np.ndarray:
    if not path.exists():
        raise MedsynthError(what)
    return np.load(path, allow_pickle=False)


def run(ctx: StageContext) -> dict[str, Any]:
    from medsynth.metrics.utility import utility_figure, utility_metrics
    from medsynth.training.utility import utility_experiment

    config, cfg, work = ctx.config, ctx.config.utility, ctx.work
    cache, augmented = ctx.inputs["prepare"] / "cache", ctx.inputs["augment"]
    real, test = load_split(cache, "train"), load_split(cache, "val")
    synthetic = np.load(augmented / "synthetic_images.npy", allow_pickle=False)
    if len(synthetic) == 0:
        raise MedsynthError(
            f"{augmented}: the augment stage kept no synthetic cases (all flagged by the audit?); nothing to measure"
        )
    task = cfg.task
    if task == "auto":
        task = "segmentation" if (augmented / "synthetic_labels.npy").exists() else "classification"
    if task == "segmentation":
        if real["labels"] is None:
            raise MedsynthError(
                "utility.task segmentation needs label maps of the real images; the prepared data has none"
            )
        targets = _load(
            augmented / "synthetic_labels.npy",
            "utility.task segmentation needs label maps of the synthetic cases: "
            "generate them from label maps with a ControlNet (add controlnet to stages)",
        )
        real_targets, test_targets = real["labels"], test["labels"]
        num_classes = int(max(real_targets.max(), targets.max(), test_targets.max())) + 1
    else:
        targets = _load(
            augmented / "synthetic_classes.npy",
            "utility.task classification needs the class of every synthetic case: "
            "train a class-conditional model (set model.num_classes)",
        )
        real_targets, test_targets = real["classes"], test["classes"]
        if not (test_targets >= 0).any():
            raise MedsynthError(
                "utility.task classification needs class labels on the held-out real images; the prepared data has none"
            )
        num_classes = int(config.model.num_classes or max(real_targets.max(), targets.max()) + 1)
    result = utility_experiment(
        task,
        real_images=real["images"],
        real_targets=real_targets,
        synthetic_images=synthetic,
        synthetic_targets=targets,
        test_images=test["images"],
        test_targets=test_targets,
        spatial_dims=config.data.spatial_dims,
        num_classes=num_classes,
        ratio=config.augment.ratio,
        seeds=cfg.seeds,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        device=ctx.dist.device,
        progress=lambda message: print(f"utility: {message}", flush=True),
    )
    atomic_write_json(work / "utility.json", result)
    utility_figure(
        result, work / "utility.png", title=f"{config.name}: {task} on held-out real images ({len(cfg.seeds)} seeds)"
    )
    metrics = utility_metrics(result)
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_table(result["rows"], "utility_table.json")
    ctx.tracker.log_artifact(work / "utility.json")
    ctx.tracker.log_artifact(work / "utility.png")
    headline = result["metric"]
    return {"task": task} | {
        f"{regime}/{headline}": round(result["regimes"][regime]["mean"][headline], 4) for regime in result["regimes"]
    }
