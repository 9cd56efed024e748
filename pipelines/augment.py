"""augment: audited synthetic training cases with provenance + a merged datalist for a MONAI training script.

Outputs (``output_dir/augment/``): ``synthetic/synthetic_XXXX.nii.gz`` each with a
``synthetic_XXXX.json`` provenance sidecar (``"synthetic": true``, model, training run id, seed,
sampler, config digest, code version, its memorisation-audit ratios), and ``datalist_augmented.json``:
the real training cases plus synthetic ones at ``augment.ratio`` synthetic per real case (validation
stays real only). Paths are relative to this folder, so ``monai.data.load_decathlon_datalist(path)``
reads it as is. ``synthetic_images.npy`` (+ ``synthetic_classes.npy`` / ``synthetic_labels.npy``) hold
the kept cases normalised, for the utility stage.

Memorisation audit (``augment.audit``, :mod:`medsynth.metrics.memorisation`): every synthetic case is
compared with the training cases in image space and in the feature space of the run's feature network;
a case much closer to a training case than that case is to any other patient is flagged. With
``action: refuse`` any flag stops the stage (exit 2; the audit is logged to MLflow first, nothing is
written), with ``drop`` the flagged cases are left out and counted. ``audit.json`` names the nearest
training case of every synthetic one by its position in the training datalist (never by a name from
the data), and ``memorisation.png`` shows the closest pairs.

With ``augment.dicom: true`` every kept case is also written as a DICOM series
(``dicom/synthetic_XXXX/``, :func:`medsynth.io.dicom_synthetic.write_synthetic_series`): new UIDs, a
pseudonymous patient, DERIVED\\SECONDARY, "SYNTHETIC" in the series description and image comments,
provenance in the series.

Under ``torchrun`` the cases are drawn split across the ranks (case ``i`` on rank ``i % world_size``)
and gathered on rank 0, which alone audits, decides and writes (docs/scale_out.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config import digest, to_plain
from medsynth.data.prepare import load_summary
from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_save_npy, atomic_write_json, file_digest
from medsynth.io.nifti import spacing_affine, write_nifti
from medsynth.models.loading import load_trained_model
from medsynth.synthesis import sample_classes, synthesise, to_units, write_scan
from medsynth.tracking import code_version
from pipelines.features import preflight  # noqa: F401 - the runner checks a feature weights file before any stage runs
from pipelines.inputs import sampling_inputs
from pipelines.specs import augment_section
from pipelines.stage import StageContext


def _relative(entry: dict, prepare_dir: Path, out_dir: Path) -> dict:
    item = dict(entry)
    for key in ("image", "label"):
        if key in item and not os.path.isabs(item[key]):
            item[key] = os.path.relpath(prepare_dir / item[key], out_dir)
    return item


def run(ctx: StageContext) -> dict[str, Any]:
    config, work = ctx.config, ctx.work
    cfg = augment_section(config)
    prepare_dir = ctx.inputs["prepare"]
    final_dir = Path(config.output_dir) / "augment"
    real = json.loads((prepare_dir / "datalist.json").read_text())
    n_real = len(real["training"])
    wanted = max(1, math.ceil(cfg["ratio"] * n_real))
    count = cfg["num_samples"] or wanted

    model_path = ctx.inputs["train"] / "model.pt"
    trained = load_trained_model(model_path, ctx.dist.device)
    seeds = [cfg["seed"] + i for i in range(count)]
    # Class-conditional models: every class in turn (a balanced synthetic set), guided like sample.
    classes = sample_classes(None, count, trained.num_classes)
    controlnet, label_maps, label_sources, _ = sampling_inputs(ctx, count)
    # Under torchrun every rank draws its share; rank 0 gets all cases and alone audits and writes.
    images, seconds = synthesise(
        trained,
        sampler=cfg["sampler"],
        steps=cfg["steps"],
        seeds=seeds,
        batch_size=cfg["batch_size"],
        device=ctx.dist.device,
        eta=cfg["eta"],
        desc="augment",
        class_labels=classes,
        guidance_scale=cfg["guidance_scale"],
        decode_roi=cfg["decode"]["roi"],
        decode_overlap=cfg["decode"]["overlap"],
        controlnet=controlnet,
        label_maps=label_maps,
        conditioning_scale=config.controlnet.conditioning_scale,
        dist=ctx.dist,
    )
    if images is None:  # a rank > 0: its share is with rank 0
        return {}

    summary = load_summary(prepare_dir / "cache")
    train_summary = ctx.upstream_manifest("train").get("summary", {})
    units = to_units(images, trained.intensity)
    audit, keep = audit_synthetic(ctx, images, count)
    kept = [i for i in range(count) if keep[i]]

    provenance_base = {
        "synthetic": True,
        "generator": "medsynth",
        "model_uri": train_summary.get("model_uri"),
        "model_file": str(model_path.resolve()),
        "model_sha256": file_digest(model_path),
        "model_step": trained.step,
        "train_run_id": train_summary.get("mlflow_run_id"),
        "augment_run_id": ctx.tracker.run_id or None,
        "sampler": cfg["sampler"],
        "steps": cfg["steps"],
        "guidance_scale": cfg["guidance_scale"] if classes is not None else None,
        "config_digest": digest(to_plain(config)),
        "code_version": code_version(),
        "modality": trained.intensity["modality"],
    }
    modality = trained.intensity["modality"]
    # Phantoms say what they show; for your own scans the region is left unstated rather than guessed.
    body_part = (
        {"brain_mri": "HEAD", "body_ct": "ABDOMEN"}.get(config.data.phantom.kind)
        if config.data.source == "phantom"
        else None
    )
    synthetic = []
    for i in kept:
        image, seed = units[i], seeds[i]
        name = f"synthetic_{i:04d}"
        write_scan(
            work / "synthetic" / f"{name}.nii.gz",
            image[0],
            summary["spacing_mm"],
            modality=modality,
            description=f"medsynth SYNTHETIC seed {seed}",
        )
        extra = {} if classes is None else {"class_label": classes[i]}
        sidecar: dict = {}
        if label_maps is not None:  # paired (image, label) for segmentation training
            write_nifti(
                work / "synthetic" / f"{name}_label.nii.gz",
                label_maps[i, 0].astype(np.uint8),
                spacing_affine(list(summary["spacing_mm"]), label_maps.shape[2:]),
                description="medsynth label map of a synthetic image",
            )
            extra["label"] = f"synthetic/{name}_label.nii.gz"
            sidecar = {"label_map_source": label_sources[i], "conditioning_scale": config.controlnet.conditioning_scale}
        if audit is not None:
            sidecar["memorisation_audit"] = {
                space: _finite(audit.per_scan[i][space]["ratio"]) for space in audit.spaces
            } | {"threshold": audit.threshold, "flagged": bool(audit.per_scan[i]["flagged"])}
        provenance = provenance_base | {"seed": seed, "index": i} | extra | sidecar
        atomic_write_json(work / "synthetic" / f"{name}.json", provenance)
        entry = {
            "image": f"synthetic/{name}.nii.gz",
            "case_id": name,
            "modality": modality,
            "synthetic": True,
            "provenance": f"synthetic/{name}.json",
        } | extra
        if cfg["dicom"]:
            from medsynth.io.dicom_synthetic import write_synthetic_series

            write_synthetic_series(
                image[0],
                spacing_affine(list(summary["spacing_mm"]), image[0].shape),
                work / "dicom" / name,
                modality=modality,
                provenance=provenance,
                patient_key=f"{provenance_base['model_sha256']}:{seed}",
                series_description=f"medsynth SYNTHETIC seed {seed}",
                body_part=body_part,
            )
            entry["dicom"] = f"dicom/{name}"
        synthetic.append(entry)

    atomic_save_npy(work / "synthetic_images.npy", images[kept].astype(np.float32))
    if classes is not None:
        atomic_save_npy(work / "synthetic_classes.npy", np.asarray(classes, dtype=np.int64)[kept])
    if label_maps is not None:
        atomic_save_npy(work / "synthetic_labels.npy", label_maps[kept].astype(np.uint8))
    used = synthetic[: min(len(synthetic), wanted)]
    merged = {
        "description": f"{n_real} real + {len(used)} synthetic training cases (medsynth augment)",
        "training": [_relative(e, prepare_dir, final_dir) for e in real["training"]] + used,
        "validation": [_relative(e, prepare_dir, final_dir) for e in real["validation"]],
    }
    atomic_write_json(work / "datalist_augmented.json", merged)
    metrics = {
        "augment/num_real": n_real,
        "augment/num_synthetic": len(used),
        "augment/effective_ratio": len(used) / n_real,
        "augment/num_generated": count,
        "augment/num_dropped": count - len(kept),
        "augment/seconds": seconds,
    }
    if audit is not None:
        metrics |= {f"augment/{k}": float(v) for k, v in audit.summary().items()}
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(work / "datalist_augmented.json")
    return metrics


def audit_synthetic(ctx: StageContext, images: np.ndarray, count: int) -> tuple[Any, list[bool]]:
    """Run the memorisation audit (``augment.audit``); returns it and which cases are kept.

    Refuses (MedsynthError) when a case is flagged and the action is ``refuse``, after logging the audit.
    """
    cfg = ctx.config.augment.audit
    if not cfg.enabled:
        return None, [True] * count
    from medsynth.metrics.memorisation import audit_figure, memorisation_audit
    from pipelines.features import feature_network, train_groups

    cache = ctx.inputs["prepare"] / "cache"
    train = np.load(cache / "train_images.npy", allow_pickle=False)
    groups = train_groups(cache)
    synthetic_features = train_features = network = None
    if cfg.features:
        network = feature_network(ctx)
        embed = {
            "spatial_dims": ctx.config.data.spatial_dims,
            "device": ctx.dist.device,
            "slices_per_plane": ctx.config.evaluate.features.slices_per_plane,
        }
        synthetic_features, train_features = network.embed(images, **embed), network.embed(train, **embed)
    audit = memorisation_audit(
        images,
        train,
        groups,
        threshold=cfg.threshold,
        rule=cfg.rule,
        synthetic_features=synthetic_features,
        train_features=train_features,
    )
    flagged = audit.flagged()
    atomic_write_json(
        ctx.work / "audit.json",
        audit.to_json() | {"action": cfg.action, "feature_network": None if network is None else network.identity},
    )
    audit_figure(audit, images, train, ctx.work / "memorisation.png", top=cfg.figure_pairs)
    ctx.tracker.log_artifact(ctx.work / "audit.json")
    ctx.tracker.log_artifact(ctx.work / "memorisation.png")
    if flagged and cfg.action == "refuse":
        ctx.tracker.log_metrics({f"augment/{k}": float(v) for k, v in audit.summary().items()})
        raise MedsynthError(
            f"augment.audit: {len(flagged)} of {count} synthetic cases are closer to a training case than "
            f"{cfg.threshold} x that case's distance to any other patient (possible memorisation; "
            f"cases {flagged[:10]}); the audit and memorisation.png are in the "
            f"MLflow run {ctx.tracker.run_id or '(untracked)'}; set augment.audit.action=drop to leave them out"
        )
    if flagged:
        print(
            f"augment: dropped {len(flagged)} of {count} synthetic cases flagged by the memorisation audit "
            f"(threshold {cfg.threshold}, {'image and feature' if cfg.features else 'image'} space, rule {cfg.rule})",
            flush=True,
        )
    flagged_set = set(flagged)
    return audit, [i not in flagged_set for i in range(count)]


def _finite(value: float) -> float | None:
    """JSON has no infinity (a ratio is infinite when two training patients' scans are identical)."""
    return float(value) if np.isfinite(value) else None
