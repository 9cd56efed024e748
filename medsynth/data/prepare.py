"""Data sources to one datalist and cached model inputs.

A source is either the procedural phantoms (written as real NIfTI files) or a folder of the user's
NIfTI files / DICOM series (DICOM converted to NIfTI). Either way the result is a MONAI-style datalist
(``{"training": [...], "validation": [...]}``, readable with ``monai.data.load_decathlon_datalist``)
and arrays of model inputs split by case with a seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsynth.config import DataConfig
from medsynth.data.patches import PatchSet, crop_rois, plane_axes
from medsynth.data.phantoms import PHANTOM_AXIS_SIGNS, generate_phantom
from medsynth.data.transforms import Intensity, intensity_for, model_inputs, model_volume, planned_shape
from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_write_json
from medsynth.io.nifti import spacing_affine, write_nifti
from medsynth.io.volumes import Volume, find_images, read_any

Progress = Callable[[int], None] | None


@dataclass
class Case:
    """One subject: its image file (relative to the prepare folder when written there) and optional labels."""

    case_id: str
    image: str
    label: str | None = None
    class_label: int | None = None
    source: str = "phantom"


@dataclass
class Prepared:
    """Model inputs of one split, channel-first, with one index row per input."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def safe_name(text: str, *, fallback: str = "case") -> str:
    """A file-name-safe identifier: no separators or parent references can escape the output folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or fallback
    return name[:80]


def phantom_cases(
    data: DataConfig, out_dir: Path, seed: int, progress: Progress = None
) -> tuple[list[Case], list[Volume], list[np.ndarray]]:
    """Generate ``data.phantom.count`` phantoms, write them as NIfTI under ``out_dir``.

    Case ``i`` is generated with seed ``seed * 100003 + i``, so every case is reproducible alone.
    """
    cfg = data.phantom
    spacing = [cfg.fov_mm / cfg.shape[0]] * len(cfg.shape)
    affine = spacing_affine(spacing, tuple(cfg.shape), signs=PHANTOM_AXIS_SIGNS)
    cases, volumes, label_maps = [], [], []
    for i in range(cfg.count):
        phantom = generate_phantom(
            cfg.kind,
            tuple(cfg.shape),
            seed * 100003 + i,
            **({"bias_field": cfg.bias_field} if cfg.kind == "brain_mri" else {}),
            lesion_probability=cfg.lesion_probability,
            lesion_size=cfg.lesion_size,
            **({} if cfg.noise is None else {"noise_std" if cfg.kind == "brain_mri" else "noise_std_hu": cfg.noise}),
        )
        case_id = f"phantom_{i:04d}"
        image_rel, label_rel = f"images/{case_id}.nii.gz", f"labels/{case_id}.nii.gz"
        # CT is stored like scanners store it: integer HU.
        on_disk = (
            np.rint(phantom.image).astype(np.int16) if phantom.modality == "ct" else phantom.image.astype(np.float32)
        )
        write_nifti(out_dir / image_rel, on_disk, affine, description=f"medsynth phantom {cfg.kind}")
        write_nifti(out_dir / label_rel, phantom.labels.astype(np.uint8), affine, description="medsynth phantom labels")
        cases.append(Case(case_id, image_rel, label_rel, int(phantom.class_label), "phantom"))
        volumes.append(Volume(on_disk.astype(np.float32), affine, image_rel, phantom.modality))
        label_maps.append(phantom.labels)
        if progress is not None:
            progress(1)
    return cases, volumes, label_maps


def folder_cases(data: DataConfig, out_dir: Path, progress: Progress = None) -> tuple[list[Case], list[Volume], str]:
    """Read and validate every NIfTI file and DICOM series under ``data.folder``.

    DICOM series are converted to NIfTI under ``out_dir/images`` (named by index, never by patient
    data); NIfTI files are referenced where they are. Returns the cases, their volumes and the modality.
    """
    folder = Path(data.folder)  # type: ignore[arg-type]
    found = find_images(folder)
    max_dims = 3
    cases: list[Case] = []
    volumes: list[Volume] = []
    for kind, path in found:
        for volume in read_any(kind, path):
            if data.spatial_dims == 3 and (volume.array.ndim != 3 or min(volume.array.shape) < 2):
                raise MedsynthError(
                    f"{volume.source}: expected a 3D volume for spatial_dims 3, got shape {volume.array.shape}"
                )
            if volume.array.ndim > max_dims:
                raise MedsynthError(f"{volume.source}: expected a 2D or 3D image, got shape {volume.array.shape}")
            index = len(cases)
            if kind == "dicom":
                case_id = f"dicom_series_{index:04d}"
                image_rel = f"images/{case_id}.nii.gz"
                write_nifti(out_dir / image_rel, volume.array, volume.affine, description="medsynth from DICOM")
                image_ref = image_rel
            else:
                stem = path.name.removesuffix(".gz").removesuffix(".nii")
                case_id = f"{safe_name(stem)}_{index:04d}"
                image_ref = str(path.resolve())
            cases.append(Case(case_id, image_ref, None, None, kind))
            volumes.append(volume)
        if progress is not None:
            progress(1)
    modality = data.modality
    if modality is None:
        seen = {v.modality for v in volumes if v.modality}
        if len(seen) > 1:
            raise MedsynthError(
                f"{folder}: series of several modalities ({', '.join(sorted(seen))}); set data.modality"
            )
        if not seen:
            raise MedsynthError(f"{folder}: the modality of NIfTI files is unknown; set data.modality to mr or ct")
        modality = seen.pop()
    for volume in volumes:
        if volume.modality and volume.modality != modality:
            raise MedsynthError(f"{volume.source}: modality {volume.modality} but data.modality is {modality}")
    return cases, volumes, modality


def check_folder_patches(data: DataConfig) -> None:
    """Before any run starts: every scan under ``data.folder`` reads, and is no smaller than the patch
    (``data.image_size``) at the spacing it will be cropped at.

    Raises:
        MedsynthError: an unreadable scan, or one smaller than the patch (named by file).
    """
    if data.source != "folder" or data.patches is None:
        return
    axes = plane_axes(data.patches.axes, data.slice_axis)
    for kind, path in find_images(Path(data.folder)):  # type: ignore[arg-type]
        for volume in read_any(kind, path):
            spatial = planned_shape(volume.array.shape, volume.affine, data)
            if data.spatial_dims == 3 and len(spatial) != 3:
                raise MedsynthError(f"{volume.source}: expected a 3D volume for spatial_dims 3, got shape {spatial}")
            crop_rois(data.image_size, spatial, axes, str(volume.source))


def split_cases(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of case indices into (train, validation); both non-empty."""
    if count < 2:
        raise MedsynthError(f"need at least 2 cases to split into training and validation, found {count}")
    order = np.random.default_rng(seed).permutation(count)
    n_val = min(count - 1, max(1, int(round(val_fraction * count))))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def preprocess_cases(
    cases: list[Case],
    volumes: list[Volume],
    label_maps: list[np.ndarray] | None,
    data: DataConfig,
    modality: str,
    progress: Progress = None,
) -> Prepared:
    """Model inputs of every case (2D slices or 3D volumes) with their intensity conventions."""
    out = Prepared()
    for i, (case, volume) in enumerate(zip(cases, volumes)):
        intensity: Intensity = intensity_for(volume.array, data, modality)
        labels = label_maps[i] if label_maps is not None else None
        for image, label, slice_index, spacing in model_inputs(volume.array, volume.affine, labels, data, intensity):
            out.images.append(image)
            if label is not None:
                out.labels.append(label)
            out.classes.append(-1 if case.class_label is None else int(case.class_label))
            out.rows.append(
                {"case_id": case.case_id, "slice": slice_index, "spacing": spacing, "intensity": intensity.as_dict()}
            )
        if progress is not None:
            progress(1)
    return out


@dataclass
class PreparedVolumes:
    """Whole scans of one split for patch training (``data.patches``): normalised, RAS, own spacing."""

    volumes: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def patch_set(self, data: DataConfig) -> PatchSet:
        """The random-crop training set of these scans (named by case id, never by path)."""
        patches = data.patches
        assert patches is not None
        return PatchSet(
            self.volumes,
            self.masks,
            data.image_size,
            per_scan=patches.per_scan,
            foreground=patches.foreground,
            axes=plane_axes(patches.axes, data.slice_axis),
            flips=patches.flips,
            rotations=patches.rotations,
            names=[row["case_id"] for row in self.rows],
        )


def preprocess_volumes(
    cases: list[Case], volumes: list[Volume], data: DataConfig, modality: str, progress: Progress = None
) -> PreparedVolumes:
    """Every case as one whole normalised scan (:func:`~medsynth.data.transforms.model_volume`)."""
    out = PreparedVolumes()
    for case, volume in zip(cases, volumes):
        intensity = intensity_for(volume.array, data, modality)
        array, mask, spacing = model_volume(volume.array, volume.affine, data, intensity, modality)
        if data.spatial_dims == 3 and array.ndim != 4:
            raise MedsynthError(f"{case.case_id}: expected a 3D volume for spatial_dims 3, got shape {array.shape[1:]}")
        if data.spatial_dims == 2 and array.ndim == 4:
            spacing = [s for a, s in enumerate(spacing) if a != data.slice_axis]
        out.volumes.append(array)
        out.masks.append(mask)
        out.classes.append(-1 if case.class_label is None else int(case.class_label))
        out.rows.append(
            {
                "case_id": case.case_id,
                "shape": list(array.shape[1:]),
                "spacing": spacing,
                "intensity": intensity.as_dict(),
            }
        )
        if progress is not None:
            progress(1)
    return out


def save_volumes(prepared: PreparedVolumes, cache_dir: Path, split: str) -> None:
    """Write one split's whole scans as ``<split>_volumes/<k>.npy`` + ``<k>_mask.npy`` and an index."""
    folder = cache_dir / f"{split}_volumes"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (volume, mask) in enumerate(zip(prepared.volumes, prepared.masks)):
        np.save(folder / f"{k:04d}.npy", volume)
        np.save(folder / f"{k:04d}_mask.npy", mask.astype(np.uint8))
    atomic_write_json(cache_dir / f"{split}_volumes.json", {"classes": prepared.classes, "rows": prepared.rows})


def load_volumes(cache_dir: Path, split: str) -> PreparedVolumes:
    """Read what :func:`save_volumes` wrote (no pickles)."""
    index = json.loads((cache_dir / f"{split}_volumes.json").read_text())
    folder = cache_dir / f"{split}_volumes"
    count = len(index["rows"])
    return PreparedVolumes(
        volumes=[np.load(folder / f"{k:04d}.npy", allow_pickle=False) for k in range(count)],
        masks=[np.load(folder / f"{k:04d}_mask.npy", allow_pickle=False).astype(bool) for k in range(count)],
        classes=list(index["classes"]),
        rows=list(index["rows"]),
    )


def fixed_patches(prepared: PreparedVolumes, data: DataConfig, seed: int) -> Prepared:
    """``data.patches.cached`` reproducible crops per scan as cached model inputs (validation loss, previews)."""
    patches = data.patches
    assert patches is not None
    crops = prepared.patch_set(data).fixed(patches.cached, seed)
    out = Prepared()
    for k, crop in enumerate(crops):
        row = prepared.rows[k // patches.cached]
        out.images.append(crop)
        out.classes.append(prepared.classes[k // patches.cached])
        out.rows.append(
            {
                "case_id": row["case_id"],
                "patch": k % patches.cached,
                "spacing": row["spacing"],
                "intensity": row["intensity"],
            }
        )
    return out


def save_split(prepared: Prepared, cache_dir: Path, split: str) -> None:
    """Write one split as ``<split>_images.npy`` (+ labels, classes) and ``<split>_index.json``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache_dir / f"{split}_images.npy", np.stack(prepared.images).astype(np.float32))
    if prepared.labels:
        np.save(cache_dir / f"{split}_labels.npy", np.stack(prepared.labels).astype(np.uint8))
    np.save(cache_dir / f"{split}_classes.npy", np.asarray(prepared.classes, dtype=np.int64))
    atomic_write_json(cache_dir / f"{split}_index.json", prepared.rows)


def load_split(cache_dir: Path, split: str) -> dict[str, np.ndarray | list | None]:
    """Read what :func:`save_split` wrote (no pickles)."""
    labels_path = cache_dir / f"{split}_labels.npy"
    return {
        "images": np.load(cache_dir / f"{split}_images.npy", allow_pickle=False),
        "labels": np.load(labels_path, allow_pickle=False) if labels_path.exists() else None,
        "classes": np.load(cache_dir / f"{split}_classes.npy", allow_pickle=False),
        "index": json.loads((cache_dir / f"{split}_index.json").read_text()),
    }


def load_summary(cache_dir: Path) -> dict:
    """The prepare stage's ``cache/summary.json`` (modality, spacing, intensity convention, labels)."""
    return json.loads((cache_dir / "summary.json").read_text())


def datalist(cases: list[Case], train_idx: list[int], val_idx: list[int], modality: str) -> dict:
    """A MONAI-style datalist of the cases (paths relative to the datalist's folder or absolute)."""

    def entry(case: Case) -> dict:
        item = {"image": case.image, "case_id": case.case_id, "modality": modality, "synthetic": False}
        if case.label is not None:
            item["label"] = case.label
        if case.class_label is not None:
            item["class_label"] = case.class_label
        return item

    return {"training": [entry(cases[i]) for i in train_idx], "validation": [entry(cases[i]) for i in val_idx]}
