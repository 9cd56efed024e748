"""augment: synthetic training cases with provenance + a merged datalist for a MONAI training script.

Outputs (``output_dir/augment/``): ``synthetic/synthetic_XXXX.nii.gz`` each with a
``synthetic_XXXX.json`` provenance sidecar (``"synthetic": true``, model, training run id, seed,
sampler, config digest, code version), and ``datalist_augmented.json``: the real training cases plus
synthetic ones at ``augment.ratio`` synthetic per real case (validation stays real only). Paths are
relative to this folder, so ``monai.data.load_decathlon_datalist(path)`` reads it as is.
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
from medsynth.io.atomic import atomic_write_json, file_digest
from medsynth.models.loading import load_trained_model
from medsynth.synthesis import sample_classes, synthesise, to_units, write_scan
from medsynth.tracking import code_version
from medsynth.io.nifti import spacing_affine, write_nifti
from pipelines.controlnet import sampling_inputs
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
    summary = load_summary(prepare_dir / "cache")
    real = json.loads((prepare_dir / "datalist.json").read_text())
    n_real = len(real["training"])
    wanted = max(1, math.ceil(cfg["ratio"] * n_real))
    count = cfg["num_samples"] or wanted

    model_path = ctx.inputs["train"] / "model.pt"
    trained = load_trained_model(model_path, ctx.dist.device)
    train_summary = ctx.upstream_manifest("train").get("summary", {})
    seeds = [cfg["seed"] + i for i in range(count)]
    # Class-conditional models: every class in turn (a balanced synthetic set), guided like sample.
    classes = sample_classes(None, count, trained.num_classes)
    controlnet, label_maps, label_sources, _ = sampling_inputs(ctx, count)
    images, seconds = synthesise(trained, sampler=cfg["sampler"], steps=cfg["steps"], seeds=seeds, batch_size=cfg["batch_size"],
                                 device=ctx.dist.device, eta=cfg["eta"], desc="augment", class_labels=classes,
                                 guidance_scale=cfg["guidance_scale"], decode_roi=cfg["decode"]["roi"], decode_overlap=cfg["decode"]["overlap"],
                                 controlnet=controlnet, label_maps=label_maps, conditioning_scale=config.controlnet.conditioning_scale)
    units = to_units(images, trained.intensity)

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
    synthetic = []
    for i, (image, seed) in enumerate(zip(units, seeds)):
        name = f"synthetic_{i:04d}"
        write_scan(work / "synthetic" / f"{name}.nii.gz", image[0], summary["spacing_mm"], modality=trained.intensity["modality"],
                   description=f"medsynth SYNTHETIC seed {seed}")
        extra = {} if classes is None else {"class_label": classes[i]}
        sidecar: dict = {}
        if label_maps is not None:  # paired (image, label) for segmentation training
            write_nifti(work / "synthetic" / f"{name}_label.nii.gz", label_maps[i, 0].astype(np.uint8),
                        spacing_affine(list(summary["spacing_mm"]), label_maps.shape[2:]), description="medsynth label map of a synthetic image")
            extra["label"] = f"synthetic/{name}_label.nii.gz"
            sidecar = {"label_map_source": label_sources[i], "conditioning_scale": config.controlnet.conditioning_scale}
        atomic_write_json(work / "synthetic" / f"{name}.json", provenance_base | {"seed": seed, "index": i} | extra | sidecar)
        synthetic.append({"image": f"synthetic/{name}.nii.gz", "case_id": name, "modality": trained.intensity["modality"],
                          "synthetic": True, "provenance": f"synthetic/{name}.json"} | extra)

    used = synthetic[: min(count, wanted)]
    merged = {
        "description": f"{n_real} real + {len(used)} synthetic training cases (medsynth augment)",
        "training": [_relative(e, prepare_dir, final_dir) for e in real["training"]] + used,
        "validation": [_relative(e, prepare_dir, final_dir) for e in real["validation"]],
    }
    atomic_write_json(work / "datalist_augmented.json", merged)
    metrics = {"augment/num_real": n_real, "augment/num_synthetic": len(used), "augment/effective_ratio": len(used) / n_real,
               "augment/seconds": seconds}
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(work / "datalist_augmented.json")
    return metrics

