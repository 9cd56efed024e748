"""evaluate: synthetic samples against held-out real images, and denoised scans against clean ones.

Samples (when the config runs ``sample``): MMD (MONAI), MS-SSIM diversity of samples vs the real
set, per-label-class intensity distances; on the features of the run's feature network
(:mod:`pipelines.features`; 2.5D for volumes) FID, improved precision/recall and kernel MMD; a
memorisation audit of the samples against the training images; ``metrics.json``, ``evaluation.png``,
``memorisation.png``, ``audit.json``. Then the MLflow review (:mod:`medsynth.review`): a table of this
evaluation beside earlier comparable ones (``evaluation_summary.json``) and ``runs_comparison.png``,
logged to this stage's run and to the pipeline's parent run, and the registered model's
``tracking.best_alias`` moved to this run's model when it beats the current best on
``tracking.best_metric``. New pixel metrics join :func:`medsynth.metrics.fidelity.evaluate_fidelity`
without touching this stage.

Denoising (when the config runs ``denoise``): PSNR and SSIM (MONAI) of every method and of the noisy
input at every noise level, over the whole image and inside the foreground, with the data range
stated (the clean scan's max - min), and the foreground contrast slope (``slope_fg``: 1 keeps the
clean scan's contrast, < 1 compressed it; :mod:`medsynth.metrics.restoration`); ``denoise_metrics.json``,
an MLflow table, ``psnr_vs_noise.png`` and ``denoise_comparison.png`` (noisy / each method / clean, with
error maps).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from medsynth.config import to_plain
from medsynth.data.prepare import load_summary
from medsynth.denoise.scan import to_ras
from medsynth.errors import MedsynthError
from medsynth.figures import denoise_figure, evaluation_figure, psnr_plot
from medsynth.io.atomic import atomic_write_json
from medsynth.io.volumes import read_nifti
from medsynth.metrics.fidelity import evaluate_fidelity, ssim_settings
from medsynth.metrics.restoration import foreground, restoration_metrics, restoration_settings
from pipelines.features import preflight  # noqa: F401 - the runner checks a feature weights file before any stage runs
from pipelines.stage import StageContext

# The scores of restoration_metrics with a mask, averaged per method and level and logged to MLflow.
DENOISE_SCORES = ("psnr", "ssim", "psnr_fg", "ssim_fg", "slope_fg")


def run(ctx: StageContext) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "sample" in ctx.inputs:
        results |= evaluate_samples(ctx)
    if "denoise" in ctx.inputs:
        results |= evaluate_denoising(ctx)
    return results


def evaluate_denoising(ctx: StageContext) -> dict[str, Any]:
    """Score the denoise stage's outputs against the clean scans (see the module docstring)."""
    work, folder = ctx.work, ctx.inputs["denoise"]
    record = json.loads((folder / "denoise.json").read_text())
    modality, levels, methods = record["modality"], record["levels"], record["methods"]
    rows, per_image = [], []
    for entry in record["entries"]:
        clean = read_nifti(entry["clean"]).array
        mask = foreground(clean, modality)
        data_range = float(clean.max() - clean.min())
        for method in ["noisy", *methods]:
            path = folder / (entry["noisy"] if method == "noisy" else entry["methods"][method]["file"])
            estimate = read_nifti(path).array
            if estimate.shape != clean.shape and estimate.size == clean.size:
                estimate = estimate.reshape(clean.shape)  # a one-slice scan (X, Y, 1) written as (X, Y)
            values = restoration_metrics(estimate, clean, data_range=data_range, mask=mask)
            per_image.append(
                {"level": entry["level"], "case_id": entry["case_id"], "method": method, "data_range": data_range}
                | values
            )
    for level in levels:
        for method in ["noisy", *methods]:
            chosen = [r for r in per_image if r["level"] == level and r["method"] == method]
            row = {"noise": record["noise"], "level": level, "method": method, "images": len(chosen)}
            row |= {k: float(np.mean([c[k] for c in chosen])) for k in DENOISE_SCORES}
            if method != "noisy":
                row["seconds_per_image"] = float(
                    np.mean([e["methods"][method]["seconds"] for e in record["entries"] if e["level"] == level])
                )
            rows.append(row)
    metrics = {f"denoise/{r['method']}/{r['level']}/{k}": r[k] for r in rows for k in DENOISE_SCORES}
    # The headline: diffusion's gain over the best classical baseline at each level.
    classical = [m for m in methods if m != "diffusion"]
    if "diffusion" in methods and classical:
        for level in levels:
            at = {r["method"]: r for r in rows if r["level"] == level}
            best = max(classical, key=lambda m: at[m]["psnr"])
            metrics[f"denoise/gain_over_best_classical/{level}/psnr"] = at["diffusion"]["psnr"] - at[best]["psnr"]
    sample = read_nifti(folder / record["entries"][0]["noisy"]).array
    details = {
        "noise": record["noise"],
        "levels": levels,
        "level_meaning": record["level_meaning"],
        "sigma": record["sigma"],
        "data_range": "max - min of each clean scan",
        "mask": "foreground: MR > 10 % of the 99th percentile; CT > -500 HU",
        "slope_fg": "least-squares slope of the foreground voxels against the clean scan's (1: contrast kept, < 1: "
        "compressed; NaN for a constant clean foreground)",
        "settings": restoration_settings(sample.shape, 1.0),
        "table": rows,
        "per_image": per_image,
    }
    atomic_write_json(work / "denoise_metrics.json", details)
    psnr_plot(rows, work / "psnr_vs_noise.png", level_label=record["level_meaning"])
    figure_entry = [
        e
        for e in record["entries"]
        if e["level_index"] == (len(levels) + ctx.config.denoise.figure_level) % len(levels)
    ][0]
    clean = read_nifti(figure_entry["clean"])

    def shown(array: np.ndarray) -> np.ndarray:  # RAS voxel order, as the other figures: anterior up
        return to_ras(array, clean.affine)[0]

    panels = {"noisy": shown(read_nifti(folder / figure_entry["noisy"]).array)}
    panels |= {m: shown(read_nifti(folder / figure_entry["methods"][m]["file"]).array) for m in methods}
    denoise_figure(
        panels,
        shown(clean.array),
        work / "denoise_comparison.png",
        title=f"{record['noise']} {figure_entry['level']} ({record['level_meaning']}), {figure_entry['case_id']}"
        + (", soft-tissue window W400 L40" if record["modality"] == "ct" else ""),
        window=(-160.0, 240.0) if record["modality"] == "ct" else None,
    )
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_table(rows, "denoise_table.json")
    for name in ("denoise_metrics.json", "psnr_vs_noise.png", "denoise_comparison.png"):
        ctx.tracker.log_artifact(work / name)
    return {k: round(v, 4) for k, v in metrics.items() if "gain" in k or "/diffusion/" in k}


def class_agreement(ctx: StageContext, requested: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    """Does each class-conditional sample show its requested class? A classifier trained on the real
    training images (seeded) labels the samples; its accuracy on held-out real images is the ceiling
    the agreement is read against. Diversity (pairwise MS-SSIM) is reported per class as well."""
    from medsynth.metrics.fidelity import pairwise_ms_ssim
    from medsynth.training.classifier import train_classifier

    cache, config = ctx.inputs["prepare"] / "cache", ctx.config
    num_classes = int(config.model.num_classes or requested.max() + 1)
    train_images = np.load(cache / "train_images.npy", allow_pickle=False)
    train_classes = np.load(cache / "train_classes.npy", allow_pickle=False)
    val_images = np.load(cache / "val_images.npy", allow_pickle=False)
    val_classes = np.load(cache / "val_classes.npy", allow_pickle=False)
    classifier = train_classifier(
        train_images,
        train_classes,
        spatial_dims=config.data.spatial_dims,
        num_classes=num_classes,
        steps=config.evaluate.classifier_steps,
        seed=config.seed,
        device=ctx.dist.device,
    )
    labelled = val_classes >= 0
    predicted = classifier.predict(fake, device=ctx.dist.device)
    metrics = {
        "eval/class/real_accuracy": classifier.accuracy(
            val_images[labelled], val_classes[labelled], device=ctx.dist.device
        ),
        "eval/class/agreement": float(np.mean(predicted == requested)),
    }
    for c in range(num_classes):
        chosen = requested == c
        if chosen.any():
            metrics[f"eval/class/{c}/agreement"] = float(np.mean(predicted[chosen] == c))
        if chosen.sum() >= 2:
            metrics[f"eval/class/{c}/diversity_ms_ssim"] = pairwise_ms_ssim(
                torch.from_numpy(fake[chosen]), spatial_dims=config.data.spatial_dims
            )
    return {
        "classifier": {
            "steps": classifier.steps,
            "seed": classifier.seed,
            "trained_on": "real training images with class labels",
            "network": "4 MONAI Convolution blocks + global max pool",
        },
        "requested": requested.tolist(),
        "predicted": predicted.tolist(),
        "metrics": metrics,
    }


def evaluate_samples(ctx: StageContext) -> dict[str, Any]:
    config, work, cfg = ctx.config, ctx.work, ctx.config.evaluate
    cache = ctx.inputs["prepare"] / "cache"
    summary = load_summary(cache)
    fake = np.load(ctx.inputs["sample"] / "samples.npy", allow_pickle=False)
    real = np.load(cache / "val_images.npy", allow_pickle=False)[: cfg.num_real]
    labels_path = cache / "val_labels.npy"
    labels = np.load(labels_path, allow_pickle=False)[: cfg.num_real] if labels_path.exists() else None
    if fake.shape[1:] != real.shape[1:]:
        raise MedsynthError(
            f"{ctx.inputs['sample'] / 'samples.npy'}: samples of shape {fake.shape[1:]} do not match "
            f"the real images {real.shape[1:]}"
        )
    class_names = {int(k): v for k, v in summary.get("label_names", {}).items()} or None
    metrics = evaluate_fidelity(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        spatial_dims=config.data.spatial_dims,
        real_labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        class_names=class_names,
        bins=cfg.histogram_bins,
    )
    metrics = {f"eval/{k}": float(v) for k, v in metrics.items()}
    classes_path = ctx.inputs["sample"] / "sample_classes.npy"
    class_check = None
    if classes_path.exists():
        class_check = class_agreement(ctx, np.load(classes_path, allow_pickle=False), fake)
        metrics |= class_check.pop("metrics")
    maps_path = ctx.inputs["sample"] / "sample_labels.npy"
    if maps_path.exists() and labels is not None:
        from medsynth.metrics.label_adherence import label_adherence

        fake_maps = np.load(maps_path, allow_pickle=False)
        count = int(max(fake_maps.max(), labels.max())) + 1
        metrics |= {
            f"eval/{k}": v for k, v in label_adherence(fake, fake_maps, real, labels, count, class_names).items()
        }
    features = feature_checks(ctx, real, fake)
    metrics |= features.pop("metrics")
    details = {
        "num_real": len(real),
        "num_fake": len(fake),
        "ssim_settings": ssim_settings(tuple(real.shape[2:])),
        "labels": labels is not None,
        "evaluate_config": to_plain(cfg),
        "class_check": class_check,
        "feature_network": features["feature_network"],
        "comparison_key": features["comparison_key"],
        "audit": features["audit_summary"],
        "metrics": metrics,
    }
    # JSON has no NaN: a class that no synthetic voxel was assigned to is recorded as null.
    atomic_write_json(
        work / "metrics.json", details | {"metrics": {k: (v if np.isfinite(v) else None) for k, v in metrics.items()}}
    )
    evaluation_figure(real, fake, metrics, work / "evaluation.png")
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_params({"eval.ssim_settings": json.dumps(details["ssim_settings"], default=str)})
    ctx.tracker.log_artifact(work / "evaluation.png")
    ctx.tracker.log_artifact(work / "metrics.json")
    for name in ("audit.json", "memorisation.png", "feature_network.pt"):
        if (work / name).exists():
            ctx.tracker.log_artifact(work / name)
    review = review_runs(ctx, metrics, features["comparison_key"], num_real=len(real), num_fake=len(fake))
    return metrics | {"best_alias": review}


def feature_checks(ctx: StageContext, real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    """Feature-space fidelity against the held-out images and the memorisation audit against the
    training images, both with the run's feature network (see :mod:`pipelines.features`)."""
    from medsynth.io.atomic import file_digest
    from medsynth.metrics.features import central_slices, feature_fidelity
    from medsynth.metrics.memorisation import audit_figure, memorisation_audit
    from medsynth.review import comparison_key
    from pipelines.features import describe, feature_network, train_groups

    config, cfg, audit_cfg = ctx.config, ctx.config.evaluate.features, ctx.config.augment.audit
    dims, device = config.data.spatial_dims, ctx.dist.device
    network = feature_network(ctx)
    # k-NN manifolds need k + 1 samples a side; small held-out sets get a smaller k, recorded beside the values.
    slices = 1
    if dims == 3 and int(network.identity.get("network_spatial_dims", 3)) == 2:  # 2.5D: every slice is a sample
        slices = min(len(central_slices(size, cfg.slices_per_plane)) for size in real.shape[2:])
    samples = min(len(real), len(fake)) * slices
    neighbours = max(1, min(cfg.k, samples - 1))
    values = feature_fidelity(
        real, fake, network, spatial_dims=dims, k=neighbours, device=device, slices_per_plane=cfg.slices_per_plane
    )
    # "mmd" here is on features; the pixel-space one keeps the name eval/mmd
    metrics = {
        "eval/" + ("feature_" + name if name.startswith("mmd") else name): float(v) for name, v in values.items()
    }
    cache = ctx.inputs["prepare"] / "cache"
    train = np.load(cache / "train_images.npy", allow_pickle=False)
    embed = {"spatial_dims": dims, "device": device, "slices_per_plane": cfg.slices_per_plane}
    use_features = audit_cfg.features
    audit = memorisation_audit(
        fake,
        train,
        train_groups(cache),
        threshold=audit_cfg.threshold,
        rule=audit_cfg.rule,
        synthetic_features=network.embed(fake, **embed) if use_features else None,
        train_features=network.embed(train, **embed) if use_features else None,
    )
    atomic_write_json(
        ctx.work / "audit.json", audit.to_json() | {"against": "training images", "feature_network": network.identity}
    )
    audit_figure(audit, fake, train, ctx.work / "memorisation.png", top=audit_cfg.figure_pairs)
    metrics |= {f"eval/{k}": float(v) for k, v in audit.summary().items()}
    real_digest = file_digest(cache / "val_images.npy")
    key = comparison_key(
        feature_weights_sha256=str(network.identity.get("weights_sha256")),
        real_sha256=real_digest,
        num_real=len(real),
        num_fake=len(fake),
    )
    ctx.tracker.log_params({"eval.feature_network": describe(network)})
    ctx.tracker.set_tags(
        {
            "medsynth.comparison_key": key,
            "medsynth.feature_network": str(network.identity.get("weights_sha256", ""))[:16],
        }
    )
    return {
        "metrics": metrics,
        "feature_network": network.identity | {"precision_recall_k": neighbours},
        "comparison_key": key,
        "audit_summary": audit.summary(),
    }


def review_runs(ctx: StageContext, metrics: dict[str, float], key: str, *, num_real: int, num_fake: int) -> str:
    """The MLflow review of this evaluation (see the module docstring); returns what happened to the best alias.

    Every store call goes through the tracker: a store lost during the review costs one warning, and the
    summary, the figure and ``best_alias.json`` are still written from what the store had answered.
    """
    from medsynth import review
    from medsynth.tracking import RunRecord

    tracker, tracking = ctx.tracker, ctx.config.tracking
    if not tracker.enabled:
        return "not tracked"
    run = tracker.current_run() or RunRecord(tracker.run_id)
    earlier = review.earlier_evaluations(tracker, key=key, limit=tracking.compare_runs)
    rows = review.summary_rows(review.row(run, metrics), earlier)
    atomic_write_json(
        ctx.work / "evaluation_summary.json",
        {"comparison_key": key, "num_real": num_real, "num_fake": num_fake, "rows": rows},
    )
    review.comparison_figure(rows, ctx.work / "runs_comparison.png")
    for name in ("evaluation_summary.json", "runs_comparison.png"):
        tracker.log_artifact(ctx.work / name)
        if run.parent_run_id:  # the pipeline run shows the review too
            tracker.log_artifact_to_run(run.parent_run_id, ctx.work / name)
    if run.parent_run_id:  # and its headline numbers
        tracker.log_metrics_to_run(run.parent_run_id, {k: metrics[k] for k in review.KEY_METRICS if k in metrics})
    train_run_id = json.loads((ctx.inputs["sample"] / "samples.json").read_text()).get("train_run_id")
    if tracking.best_metric is None or tracking.registered_model is None or not tracking.log_model or not train_run_id:
        decision = {"decision": "skipped", "reason": "no registered model or no tracking.best_metric"}
    else:
        decision = review.promote_best(
            tracker,
            registered_model=tracking.registered_model,
            train_run_id=train_run_id,
            metric=tracking.best_metric,
            value=metrics.get(tracking.best_metric),
            direction=tracking.best_direction,
            key=key,
            alias=tracking.best_alias,
        )
    atomic_write_json(ctx.work / "best_alias.json", decision)
    tracker.set_tags({"medsynth.best_alias": decision["decision"]})
    print(f"evaluate: {tracking.best_alias} alias {decision['decision']}: {decision['reason']}", flush=True)
    return decision["decision"]
