"""prepare: data source -> NIfTI files + datalist.json + cached model inputs (split by case, seeded).

Outputs (``output_dir/prepare/``): ``images/``, ``labels/`` (phantoms, or DICOM converted to NIfTI),
``datalist.json`` (MONAI style), ``cache/{train,val}_{images,labels,classes}.npy`` and index files,
``cache/summary.json`` (modality, spacing, intensity convention, label names), ``examples.png``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medsynth.config import Config, to_plain
from medsynth.data.phantoms import BRAIN_LABELS, CT_LABELS
from medsynth.data.prepare import (
    Prepared,
    PreparedVolumes,
    check_folder_patches,
    datalist,
    fixed_patches,
    folder_cases,
    phantom_cases,
    preprocess_cases,
    preprocess_volumes,
    save_split,
    save_volumes,
    split_cases,
)
from medsynth.figures import sample_grid
from medsynth.io.atomic import atomic_write_json
from pipelines.stage import StageContext


def _subset(prepared: Prepared, case_ids: set[str]) -> Prepared:
    out = Prepared()
    for k, row in enumerate(prepared.rows):
        if row["case_id"] in case_ids:
            out.images.append(prepared.images[k])
            if prepared.labels:
                out.labels.append(prepared.labels[k])
            out.classes.append(prepared.classes[k])
            out.rows.append(row)
    return out


def preflight(config: Config) -> None:
    """Checked before the pipeline starts: with ``data.patches``, every scan of the folder reads and holds the patch."""
    check_folder_patches(config.data)


def run(ctx: StageContext) -> dict[str, Any]:
    config, work = ctx.config, ctx.work
    data = config.data
    if data.source == "phantom":
        with tqdm(total=data.phantom.count, desc="prepare: phantoms", unit="case", disable=None) as bar:
            cases, volumes, label_maps = phantom_cases(data, work, config.seed, bar.update)
        modality = config.modality
        label_names = {v: k for k, v in (CT_LABELS if modality == "ct" else BRAIN_LABELS).items()}
    else:
        with tqdm(desc="prepare: reading", unit="item", disable=None) as bar:
            cases, volumes, modality = folder_cases(data, work, bar.update)
        label_maps, label_names = None, {}

    train_idx, val_idx = split_cases(len(cases), data.val_fraction, config.seed)
    cache = work / "cache"
    with tqdm(total=len(cases), desc="prepare: preprocessing", unit="case", disable=None) as bar:
        if data.patches is None:
            prepared = preprocess_cases(cases, volumes, label_maps, data, modality, bar.update)
            train = _subset(prepared, {cases[i].case_id for i in train_idx})
            val = _subset(prepared, {cases[i].case_id for i in val_idx})
        else:
            # patch training: whole scans at their own spacing, plus fixed crops as the cached inputs
            whole = preprocess_volumes(cases, volumes, data, modality, bar.update)
            splits = {}
            for split, chosen in (("train", train_idx), ("val", val_idx)):
                part = PreparedVolumes(
                    *([getattr(whole, f)[i] for i in chosen] for f in ("volumes", "masks", "classes", "rows"))
                )
                save_volumes(part, cache, split)
                splits[split] = fixed_patches(part, data, config.seed + (split == "val"))
            train, val = splits["train"], splits["val"]
    save_split(train, cache, "train")
    save_split(val, cache, "val")

    highs = [row["intensity"]["high"] for row in train.rows]
    spacing = np.median(np.asarray([row["spacing"] for row in train.rows]), axis=0).tolist()
    summary = {
        "modality": modality,
        "source": data.source,
        "spatial_dims": data.spatial_dims,
        "image_size": data.image_size,
        "spacing_mm": spacing,
        # Synthetic images go back to units with the training set's typical convention.
        "intensity": {"modality": modality, "low": train.rows[0]["intensity"]["low"], "high": float(np.median(highs))},
        "label_names": {str(k): v for k, v in sorted(label_names.items())},
        "cases": {"train": len(train_idx), "validation": len(val_idx)},
        "inputs": {"train": len(train.images), "validation": len(val.images)},
        "data_config": to_plain(data),
    }
    atomic_write_json(cache / "summary.json", summary)
    atomic_write_json(work / "datalist.json", datalist(cases, train_idx, val_idx, modality))
    title = "prepared training inputs" if data.patches is None else "training patches (fixed crops)"
    sample_grid(np.stack(train.images[:16]), work / "examples.png", title=title)

    ctx.tracker.log_metrics(
        {
            "data/train_cases": len(train_idx),
            "data/val_cases": len(val_idx),
            "data/train_inputs": len(train.images),
            "data/val_inputs": len(val.images),
        }
    )
    ctx.tracker.log_artifact(work / "datalist.json")
    ctx.tracker.log_artifact(work / "examples.png")
    return summary["cases"] | summary["inputs"]
