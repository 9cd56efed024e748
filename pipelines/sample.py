"""sample: trained model -> N synthetic scans as NIfTI + a grid beside real images.

Outputs (``output_dir/sample/``): ``images/sample_XXXX.nii.gz`` (in the data's units and model-space
spacing), ``samples.npy`` (normalised, for evaluation), ``grid.png``, ``samples.json`` (seeds,
sampler, steps, model).

Under ``torchrun`` the samples are split across the ranks (sample ``i`` on rank ``i % world_size``) and
gathered on rank 0, which alone writes; the outputs are those of one process (docs/scale_out.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsynth.config import to_plain
from medsynth.data.prepare import load_summary
from medsynth.figures import sample_grid
from medsynth.io.atomic import atomic_save_npy, atomic_write_json
from medsynth.io.nifti import spacing_affine, write_nifti
from medsynth.models.loading import load_trained_model
from medsynth.synthesis import sample_classes, synthesise, to_units, write_scan
from pipelines.inputs import sampling_inputs
from pipelines.stage import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    config, work, cfg = ctx.config, ctx.work, ctx.config.sample
    trained = load_trained_model(ctx.inputs["train"] / "model.pt", ctx.dist.device)
    seeds = [cfg.seed + i for i in range(cfg.num_samples)]
    classes = sample_classes(cfg.class_label, cfg.num_samples, trained.num_classes)
    controlnet, label_maps, label_sources, paired_real = sampling_inputs(ctx, cfg.num_samples)
    # Under torchrun every rank draws its share of the samples; rank 0 gets them all and alone writes.
    images, seconds = synthesise(
        trained,
        sampler=cfg.sampler,
        steps=cfg.steps,
        seeds=seeds,
        batch_size=cfg.batch_size,
        device=ctx.dist.device,
        eta=cfg.eta,
        class_labels=classes,
        guidance_scale=cfg.guidance_scale,
        decode_roi=config.autoencoder.decode_roi,
        decode_overlap=config.autoencoder.decode_overlap,
        controlnet=controlnet,
        label_maps=label_maps,
        conditioning_scale=config.controlnet.conditioning_scale,
        dist=ctx.dist,
    )
    if images is None:  # a rank > 0: its share is with rank 0
        return {}

    summary = load_summary(ctx.inputs["prepare"] / "cache")
    units = to_units(images, trained.intensity)
    for i, image in enumerate(units):
        write_scan(
            work / "images" / f"sample_{i:04d}.nii.gz",
            image[0],
            summary["spacing_mm"],
            modality=trained.intensity["modality"],
            description=f"medsynth SYNTHETIC {cfg.sampler}{cfg.steps} seed {seeds[i]}"
            + ("" if classes is None else f" class {classes[i]}"),
        )
    atomic_save_npy(work / "samples.npy", images.astype(np.float32))
    if label_maps is not None:  # paired (image, label) outputs
        for i, label in enumerate(label_maps):
            write_nifti(
                work / "labels" / f"sample_{i:04d}.nii.gz",
                label[0].astype(np.uint8),
                spacing_affine(list(summary["spacing_mm"]), label.shape[1:]),
                description="medsynth label map the synthetic image was generated from",
            )
        atomic_save_npy(work / "sample_labels.npy", label_maps.astype(np.uint8))
    if classes is not None:
        atomic_save_npy(work / "sample_classes.npy", np.asarray(classes, dtype=np.int64))
    real = np.load(ctx.inputs["prepare"] / "cache" / "val_images.npy", allow_pickle=False)[: len(images)]
    if label_maps is not None:  # the real image behind each label map, or the maps themselves when they were given
        real = (
            paired_real if paired_real is not None else label_maps.astype(np.float32) / max(1, label_maps.max()) * 2 - 1
        )
    sample_grid(
        images,
        work / "grid.png",
        real=real,
        title=f"{config.name}: {cfg.sampler}, {cfg.steps} steps"
        + (" (real: the images the label maps come from)" if label_maps is not None else ""),
    )
    train_summary = ctx.upstream_manifest("train").get("summary", {})
    record = {
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "eta": cfg.eta,
        "seeds": seeds,
        "classes": classes,
        "guidance_scale": cfg.guidance_scale if classes is not None else None,
        "seconds": seconds,
        "label_maps": label_sources,
        "conditioning_scale": config.controlnet.conditioning_scale if label_maps is not None else None,
        "model_file": str(trained.path),
        "model_step": trained.step,
        "model_uri": train_summary.get("model_uri"),
        "train_run_id": train_summary.get("mlflow_run_id"),
        "sample_config": to_plain(cfg),
    }
    atomic_write_json(work / "samples.json", record)

    ctx.tracker.log_metrics({"sample/seconds": seconds, "sample/seconds_per_image": seconds / len(images)})
    ctx.tracker.log_artifact(work / "grid.png")
    return {"num_samples": len(images), "seconds": round(seconds, 2)}
