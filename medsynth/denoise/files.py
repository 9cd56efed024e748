"""``medsynth denoise INPUT OUTPUT``: a NIfTI file or a DICOM series folder in, the same format out.

Everything the user can get wrong is checked before anything is computed or written: the input
(missing, corrupt, NaN, a folder with several series or with non-image objects, undecodable pixel
data), the output path, the noise level, the model. Outputs appear complete or not at all:

- NIfTI in -> NIfTI out with the input's affine and header (integer data stays integer when the
  values fit, so unchanged HU stay exact); ``<stem>.json`` beside it records how it was made;
- DICOM series in -> a derived DICOM series folder (same patient and study, new UIDs,
  DERIVED\\SECONDARY, the source images referenced, geometry kept), with ``medsynth_denoise.json``;
- with posterior draws (``--samples K``), their spread as ``<stem>_uncertainty.nii.gz``.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom.misc

from medsynth.denoise.scan import Denoised, PriorSettings, denoise_method, denoise_scan
from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_write, atomic_write_json, file_digest, staged_folder
from medsynth.io.dicom_write import write_derived_series
from medsynth.io.nifti import write_nifti
from medsynth.io.volumes import (
    NIFTI_SUFFIXES,
    Volume,
    _is_scan_slice,
    _read_dicom_header,
    _sop_class,
    read_dicom_series,
    read_nifti,
)
from medsynth.models.loading import TrainedModel


@dataclass
class ScanInput:
    """A scan read for denoising: the volume, how it was stored, and a digest of the source bytes."""

    kind: str  # "nifti" | "dicom"
    volume: Volume
    digest: str
    path: Path


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_scan(path: str | Path) -> ScanInput:
    """Read the input of ``medsynth denoise``: one NIfTI file or a folder holding exactly one DICOM series.

    Raises:
        MedsynthError: anything that is not a clean NIfTI file or a single clean image series.
    """
    path = Path(path)
    if not path.exists():
        raise MedsynthError(f"{path}: file or folder not found")
    if path.is_file():
        if _is_nifti(path):
            return ScanInput("nifti", read_nifti(path), file_digest(path), path)
        if pydicom.misc.is_dicom(path):
            raise MedsynthError(f"{path}: a single DICOM file; pass the folder that holds the whole series")
        raise MedsynthError(f"{path}: expected a NIfTI file (.nii, .nii.gz) or a folder holding one DICOM series")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    # Strict: an RT structure set, a report or a segmentation beside the slices is not silently dropped.
    dicom_files = []
    for file in files:
        header = _read_dicom_header(file)
        if header is None:
            continue
        if not _is_scan_slice(header):
            uid = _sop_class(header)
            name = pydicom.uid.UID(uid).name if uid else "unknown SOP class"
            raise MedsynthError(
                f"{file}: a non-image DICOM object ({name}); expected only the slices of one image series in {path}"
            )
        dicom_files.append(file)
    if not dicom_files:
        raise MedsynthError(f"{path}: holds no DICOM image series (and is not a NIfTI file)")
    volumes = read_dicom_series(path, recursive=False)
    if len(volumes) > 1:
        raise MedsynthError(
            f"{path}: holds {len(volumes)} DICOM series; expected exactly one (put each series in its own folder)"
        )
    digest = hashlib.sha256("".join(file_digest(f) for f in volumes[0].files).encode()).hexdigest()
    return ScanInput("dicom", volumes[0], digest, path)


def check_output(scan: ScanInput, output: str | Path, *, overwrite: bool) -> Path:
    """The output path fits the input's format and is free (or may be replaced)."""
    output = Path(output)
    if output.resolve() == scan.path.resolve():
        raise MedsynthError(f"{output}: the output would overwrite the input; choose another path")
    if scan.kind == "nifti" and not _is_nifti(output):
        raise MedsynthError(f"{output}: a NIfTI input needs a NIfTI output path (.nii or .nii.gz)")
    if scan.kind == "dicom" and _is_nifti(output):
        raise MedsynthError(f"{output}: a DICOM series input is written as a DICOM series folder, not a NIfTI file")
    if output.exists() and not overwrite:
        raise MedsynthError(f"{output}: already exists; remove it or pass --overwrite")
    if output.exists() and scan.kind == "nifti" and output.is_dir():
        raise MedsynthError(f"{output}: is a folder; expected a NIfTI file path")
    return output


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_like(source: Path, array: np.ndarray, dest: Path, description: str) -> None:
    """Write ``array`` with the source file's header and affine (integer data kept integer when exact)."""
    img = nib.load(source)
    header = img.header.copy()
    dtype = np.dtype(img.get_data_dtype())
    slope, inter = img.dataobj.slope, img.dataobj.inter
    data = array.reshape(img.shape)
    if np.issubdtype(dtype, np.integer) and slope in (1.0,) and inter in (0.0,):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max).astype(dtype)
    else:
        data = data.astype(np.float32)
        header.set_data_dtype(np.float32)
    out = type(img)(data, img.affine, header=header)
    out.header["descrip"] = description.encode("ascii", "replace")[:79]
    suffix = ".nii.gz" if dest.name.lower().endswith(".nii.gz") else ".nii"
    atomic_write(
        dest,
        lambda tmp: nib.save(out, tmp.with_name(tmp.name + suffix)) or tmp.with_name(tmp.name + suffix).replace(tmp),
    )


def derivation_text(result: Denoised) -> str:
    """One line for DerivationDescription / the NIfTI description."""
    record = result.record
    text = f"medsynth denoise: {record['method']}, sigma {result.sigma:.4g} ({record['sigma_source']})"
    if denoise_method(record["method"]).family == "prior":
        steps = (
            "1 step (Tweedie)"
            if record["steps"] is None
            else f"{record['mode']} {record['steps']} steps x {record['samples']}"
        )
        text += f", diffusion prior from t={record['timestep']}, {steps}"
    return text


def write_result(scan: ScanInput, result: Denoised, output: Path, provenance: dict[str, Any]) -> list[Path]:
    """Write the denoised scan (and uncertainty map, provenance) in the input's format, atomically."""
    written: list[Path] = []
    description = derivation_text(result)
    if scan.kind == "nifti":
        _nifti_like(scan.path, result.image, output, description)
        written.append(output)
        record_path = output.with_name(_stem(output) + ".json")
    else:
        parent = output.parent
        parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(output) as work:
            write_derived_series(work, result.image, scan.volume.files, derivation=description)
            atomic_write_json(work / "medsynth_denoise.json", provenance)
        written.append(output)
        record_path = None
    if result.uncertainty is not None:
        path = output.with_name(_stem(output) + "_uncertainty.nii.gz")
        write_nifti(
            path, result.uncertainty, scan.volume.affine, description="medsynth posterior std (units of the scan)"
        )
        written.append(path)
    if record_path is not None:
        atomic_write_json(record_path, provenance)
        written.append(record_path)
    return written


def load_denoising_model(
    checkpoint: str | Path | None, model_uri: str | None, tracking_uri: str | None, device: str
) -> tuple[TrainedModel, str]:
    """The diffusion model from a model file or an MLflow model URI, and the model file's digest.

    Raises:
        MedsynthError: no model, or both a file and a URI.
    """
    from medsynth.models.loading import load_trained_model

    if checkpoint is not None and model_uri is not None:
        raise MedsynthError("give either --checkpoint or --model-uri, not both")
    if checkpoint is None and model_uri is None:
        raise MedsynthError("the diffusion method needs a model: --checkpoint PATH or --model-uri URI")
    with tempfile.TemporaryDirectory(prefix="medsynth-model-") as tmp:
        model_file = Path(checkpoint) if checkpoint is not None else _fetch(model_uri, tmp, tracking_uri)
        return load_trained_model(model_file, device), file_digest(model_file)


def denoise_input(
    scan: ScanInput,
    *,
    method: str,
    sigma: float | None,
    modality: str | None,
    trained: TrainedModel | None,
    settings: PriorSettings | None,
    device: str,
    progress: bool,
) -> Denoised:
    """Denoise a scan read by :func:`read_scan` (nothing is written); the modality defaults to the
    DICOM series' own, else the model's.

    Raises:
        MedsynthError: a modality that contradicts the DICOM series, or none known.
    """
    modality = modality or scan.volume.modality or (trained.modality if trained is not None else None)
    if scan.volume.modality and modality != scan.volume.modality:
        raise MedsynthError(
            f"{scan.path}: the DICOM series is {scan.volume.modality.upper()} but --modality is {modality}"
        )
    if modality is None:
        raise MedsynthError(f"{scan.path}: the modality is unknown; pass --modality mr or --modality ct")
    return denoise_scan(
        scan.volume.array,
        scan.volume.affine,
        method=method,
        modality=modality,
        sigma=sigma,
        trained=trained,
        settings=settings,
        device=device,
        progress=progress,
    )


def provenance_record(
    scan: ScanInput,
    output: str | Path,
    result: Denoised,
    *,
    model_uri: str | None,
    checkpoint: str | Path | None,
    model_digest: str | None,
) -> dict[str, Any]:
    """What the provenance sidecar of a denoised scan records: input, output, model, code, settings."""
    from medsynth.tracking import code_version

    return {
        "input": str(scan.path),
        "input_kind": scan.kind,
        "input_digest": scan.digest,
        "output": str(output),
        "model_uri": model_uri,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "model_digest": model_digest,
        "code_version": code_version(),
        "denoise": result.record,
    }


def denoise_path(
    input_path: str | Path,
    output: str | Path,
    *,
    method: str = "diffusion",
    sigma: float | None = None,
    modality: str | None = None,
    checkpoint: str | Path | None = None,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    settings: PriorSettings | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Denoise a NIfTI file or a DICOM series folder into ``output`` (see the module docstring).

    Returns:
        The provenance record (also written beside / inside the output).
    """
    if sigma is not None and not (np.isfinite(sigma) and sigma >= 0):
        raise MedsynthError(f"--sigma must be 'auto' or a number >= 0, got {sigma}")
    if checkpoint is not None and model_uri is not None:
        raise MedsynthError("give either --checkpoint or --model-uri, not both")
    scan = read_scan(input_path)
    output = check_output(scan, output, overwrite=overwrite)

    trained, model_digest = (
        load_denoising_model(checkpoint, model_uri, tracking_uri, device)
        if denoise_method(method).family == "prior"
        else (None, None)
    )
    result = denoise_input(
        scan,
        method=method,
        sigma=sigma,
        modality=modality,
        trained=trained,
        settings=settings,
        device=device,
        progress=progress,
    )
    provenance = provenance_record(
        scan, output, result, model_uri=model_uri, checkpoint=checkpoint, model_digest=model_digest
    )
    written = write_result(scan, result, output, provenance)
    provenance["written"] = [str(p) for p in written]
    return provenance


def _fetch(uri: str | None, tmp: str, tracking_uri: str | None) -> Path:
    from medsynth.tracking import fetch_model_file

    assert uri is not None
    return fetch_model_file(uri, tmp, tracking_uri=tracking_uri)


def read_datalist(path: str | Path, key: str) -> list[tuple[str, Path]]:
    """The scans a MONAI-style datalist lists under ``key``: ``(name, path)`` pairs.

    Entries are paths or ``{"image": path, ...}`` objects (as in MONAI's
    ``load_decathlon_datalist``); relative paths are relative to the datalist's folder. Names come
    from NIfTI file names made file-name safe (and unique); DICOM folders are numbered, because their
    names often carry the patient's; nothing comes from the scans' headers.

    Raises:
        MedsynthError: a missing or malformed datalist, a missing key, a bad entry, a missing scan.
    """
    import json

    from medsynth.data.prepare import safe_name

    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"{path}: datalist not found (key 'denoise.datalist')")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsynthError(f"{path}: not a readable JSON datalist ({exc})") from None
    if not isinstance(document, dict) or key not in document:
        raise MedsynthError(f"{path}: has no key '{key}' (denoise.datalist_key); expected a list of scans under it")
    entries = document[key]
    if not isinstance(entries, list) or not entries:
        raise MedsynthError(f"{path}: '{key}' must be a non-empty list of scan paths or {{\"image\": path}} objects")
    scans: list[tuple[str, Path]] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str) or not image:
            raise MedsynthError(f"{path}: '{key}' entry {i}: expected a path or an object with an 'image' path")
        scan = Path(image) if Path(image).is_absolute() else path.parent / image
        if not scan.exists():
            raise MedsynthError(f"{path}: '{key}' entry {i}: {scan} not found")
        # Checked here, before any stage runs (the denoise stage's preflight), not after training.
        if not (scan.is_dir() or (scan.is_file() and _is_nifti(scan))):
            raise MedsynthError(
                f"{path}: '{key}' entry {i}: {scan} is not a NIfTI file (.nii, .nii.gz) or a folder; "
                "expected a NIfTI file or a folder holding one DICOM series"
            )
        # DICOM folders are often named after the patient: numbered instead, as prepare does.
        name = safe_name(_stem(scan)) if scan.is_file() else f"dicom_series_{i:04d}"
        while name in names:
            name = f"{name}_{i}"
        names.add(name)
        scans.append((name, scan))
    return scans
