"""Write a synthetic volume (a model's output, no source scan) as a new CT or MR Image DICOM series.

Unlike :func:`medsynth.io.dicom_write.write_derived_series`, nothing comes from a real header: every
attribute is made here, so no patient, institution or study of any training scan can leak into the
files. The series is marked synthetic wherever a person or a program looks:

- ``SeriesDescription`` and ``StudyDescription`` contain ``SYNTHETIC``; ``ImageComments`` starts with
  ``SYNTHETIC image``; ``ImageType`` is ``DERIVED\\SECONDARY\\AXIAL`` for CT (the CT Image module allows
  AXIAL or LOCALIZER as value 3) and ``DERIVED\\SECONDARY\\OTHER`` for MR (the MR Image module wants a
  value 3); ``BurnedInAnnotation`` is ``NO``; ``StudyID`` is ``SYNTHETIC``;
- the patient is a pseudonym, ``SYNTHETIC^<10 hex>`` / ``MEDSYNTH-<10 hex>``, hashed from
  ``patient_key``; ``PatientIdentityRemoved`` is ``YES`` with ``DeidentificationMethod``
  ``synthetic image; no source patient``; birth date, physicians, accession number and institution
  are empty or absent; ``PatientSex`` is ``O``.

Provenance (model URI and digest, run ids, seed, sampler, config digest, code version; only the keys in
:data:`PROVENANCE_KEYS`, so file paths and free text that might name a person never enter the files)
is written as ``key=value; ...`` text to ``DerivationDescription`` (ST, cut at 1024 characters),
``ImageComments`` (LT, in full) and the ``ContributionDescription`` of a ``ContributingEquipmentSequence``
item (Manufacturer ``medsynth``, purpose DCM 109102 "Processing Equipment"); the code version also
goes to ``SoftwareVersions``.

Reproducibility: every UID is ``generate_uid(entropy_srcs=[...])`` of a sha256 over what makes the
synthetic image what it is (voxels, affine, modality, written provenance, ``patient_key``) and the
UID's role (study, series, frame of reference, slice k). Any other volume or provenance gives other
UIDs; exporting the same image again gives the same UIDs, so an archive sees one image, not two.
``patient_key=None`` draws a fresh random patient, hence fresh UIDs. The date and time attributes
(Study/Series/Content/InstanceCreation, ContributionDateTime) hold ``created``, by default the time
of writing: with ``patient_key`` and ``created`` given, the same inputs give byte-identical files.

Geometry: the RAS affine is turned into LPS and written as ImageOrientationPatient (row direction =
the affine's first column, along which the column index ``i`` grows; column direction = its second
column), PixelSpacing ``(|second column|, |first column|)``, ImagePositionPatient per slice
(``affine @ (0, 0, k, 1)``), SliceThickness and, for 3D, SpacingBetweenSlices (the step along the slice
normal). ``volume[i, j, k]`` is column ``i``, row ``j`` of slice ``k``, the convention of
:func:`medsynth.io.volumes.read_dicom_series`, which reads the series back to the same array and
affine whenever ``det(affine[:3, :3]) > 0`` (every affine that reader itself returns). DICOM slices
have no order but their position, so with a left-handed affine the reader returns the same image in
world space with the slice axis reversed (``volume[:, :, ::-1]``). A 2D image reads back as one
slice whose third affine column is the unit slice normal times the thickness.

Values: CT in HU with RescaleType ``HU`` at 1 HU (scanners' precision, int16) unless the range needs a
coarser slope (:func:`medsynth.io.dicom_write._choose_rescale`). MR: whole numbers that fit 16 bits
are stored as they are, without rescale tags; other values (any float units) are spread over the
16-bit range, the error then being at most RescaleSlope / 2 (about 8e-6 of the value range). The MR
Image IOD has no Modality LUT module, so dciodvfy warns about those RescaleSlope/RescaleIntercept
(as it does for scanners that write them); pydicom, MONAI and the reader here apply them. Windows: CT
soft tissue (40/400 HU) then the data's 1st-99th percentile; MR the data's percentiles (width >= 1).

Laterality: with ``body_part`` (an unpaired region) BodyPartExamined is written and dciodvfy reports
nothing for CT; without it the body part, hence the side, is unknown, so Laterality (Type 2C) is present
and empty, which dciodvfy reports as a warning.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from medsynth import __version__
from medsynth.errors import MedsynthError
from medsynth.io.atomic import staged_folder
from medsynth.io.dicom_write import _MAX_LO, _MAX_ST, _UINT16, _ascii_text, _choose_rescale, _fit, _item, _Rescale, _set

__all__ = ["PROVENANCE_KEYS", "write_synthetic_series"]

MODALITIES = ("ct", "mr")
# Provenance entries written into the files, in this order. Others (model_file, label_map_source, ...)
# are left out: they are paths or free text, which may name a person or a site.
PROVENANCE_KEYS = (
    "model_uri",
    "model_sha256",
    "model_step",
    "train_run_id",
    "augment_run_id",
    "seed",
    "index",
    "class_label",
    "sampler",
    "steps",
    "eta",
    "guidance_scale",
    "conditioning_scale",
    "config_digest",
    "code_version",
)
_MAX_LT = 10240
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
# Type 2 attributes of the CT/MR Image IODs (PS3.3 A.3, A.4) with no value for a synthetic image:
# present and empty means "unknown", which is true.
_EMPTY = (
    "PatientBirthDate",
    "ReferringPhysicianName",
    "AccessionNumber",
    "PositionReferenceIndicator",
    "PatientPosition",  # Type 2C: required for CT and MR images without a patient orientation code
)
_EMPTY_IOD = {
    "ct": ("KVP", "AcquisitionNumber"),
    "mr": ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength"),
}
_SOP_CLASS = {"ct": CTImageStorage, "mr": MRImageStorage}
# Value 3 of ImageType: the CT Image module allows AXIAL or LOCALIZER (AXIAL: any cross-section); the
# MR Image module requires a value, OTHER being the defined term that claims nothing.
_IMAGE_TYPE_3 = {"ct": "AXIAL", "mr": "OTHER"}
_SOFT_TISSUE = (40.0, 400.0)  # HU window centre, width
_BODY_PART = re.compile(r"[A-Z0-9_ ]{1,16}")  # CS


# --- inputs --------------------------------------------------------------------------------------


def _check_volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim not in (2, 3) or not (
        np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)
    ):
        raise MedsynthError(
            f"volume has shape {volume.shape} and dtype {volume.dtype}; expected a real 2D (X, Y) or 3D (X, Y, Z) array"
        )
    if min(volume.shape) < 1 or max(volume.shape[:2]) > _UINT16.max:
        raise MedsynthError(
            f"volume has shape {volume.shape}; expected 1..65535 voxels along X and Y and at least one slice"
        )
    n_bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
    if n_bad:
        raise MedsynthError(f"volume contains {n_bad} NaN/Inf voxels; expected finite values")
    return volume if volume.ndim == 3 else volume[:, :, None]


def _lps_affine(affine: np.ndarray) -> np.ndarray:
    """The affine in LPS, checked: 4x4, finite, invertible, orthogonal in-plane axes."""
    try:
        affine = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MedsynthError(f"affine is not a numeric matrix ({exc}); expected a 4x4 array") from exc
    if affine.shape != (4, 4):
        raise MedsynthError(f"affine has shape {affine.shape}; expected a 4x4 voxel-to-RAS matrix")
    if not np.all(np.isfinite(affine)) or not np.allclose(affine[3], (0, 0, 0, 1)):
        raise MedsynthError(f"affine {affine.tolist()}: expected finite values and last row (0, 0, 0, 1)")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    lengths = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(lengths < 1e-6) or abs(np.linalg.det(lps[:3, :3] / lengths)) < 1e-6:
        raise MedsynthError(
            f"affine {affine.tolist()}: singular; expected a voxel-to-mm map with three independent axes"
        )
    cosine = float(lps[:3, 0] @ lps[:3, 1] / (lengths[0] * lengths[1]))
    if abs(cosine) > 1e-4:  # ImageOrientationPatient holds two orthogonal directions
        raise MedsynthError(
            f"affine {affine.tolist()}: the first two axes are not orthogonal (cosine {cosine:.2g}); "
            "expected no in-plane shear"
        )
    return lps


def _output_folder(output: str | Path) -> Path:
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MedsynthError(f"{output}: already exists and is not an empty folder; expected a new output folder")
    return output


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_value_text(v)}" for k, v in value.items() if v is not None)
    return str(value)  # str, not repr: numpy scalars print as plain numbers


def _provenance_items(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """The written provenance as (key, ASCII text); the series must be traceable to model and seed."""
    if not isinstance(provenance, dict):
        raise MedsynthError(
            f"provenance is a {type(provenance).__name__}; expected a dict with seed and model_uri or model_sha256"
        )
    if provenance.get("seed") is None or all(provenance.get(k) is None for k in ("model_uri", "model_sha256")):
        raise MedsynthError(
            "provenance lacks seed or both model_uri and model_sha256; expected the model and seed that made the volume"
        )
    return [
        (k, _ascii_text(f"provenance[{k!r}]", _value_text(provenance[k]), _MAX_LT))
        for k in PROVENANCE_KEYS
        if provenance.get(k) is not None
    ]


def _software_versions(provenance: dict[str, Any]) -> list[str]:
    code = provenance.get("code_version")
    if isinstance(code, dict):
        versions = [f"{k} {v}" for k, v in code.items() if v is not None]
    elif code is not None:
        versions = [str(code)]
    else:
        versions = [f"version {__version__}"]
    return [_ascii_text("provenance['code_version']", v, _MAX_LO) for v in versions]


# --- values --------------------------------------------------------------------------------------


def _rescale(volume: np.ndarray, modality: str) -> _Rescale:
    """How values become 16-bit pixels (see :func:`medsynth.io.dicom_write._choose_rescale`).

    CT: the derived writer's rule for a CT source without rescale: 1 HU (scanners' precision), int16;
    a coarser slope only when the range needs it. MR: whole numbers that fit 16 bits as they are,
    without rescale tags; anything else (units are arbitrary: floats of any range) spread over uint16.
    """
    if modality == "ct":
        return _choose_rescale(volume, [_item(SOPClassUID=CTImageStorage, PixelRepresentation=1)])
    lo, hi = float(volume.min()), float(volume.max())
    # Whole numbers that fit are stored as they are: exact, and no rescale, which the MR Image IOD lacks.
    if np.array_equal(volume, np.rint(volume)) and (rep := _fit(lo, hi, 1.0, 0.0, 0)) is not None:
        return _Rescale(1.0, 0.0, False, False, rep)
    spread = (hi - lo) / (_UINT16.max - 535) if hi > lo else 1.0  # a margin for the DS text of slope and intercept
    slope, intercept = float(format_number_as_ds(spread)), float(format_number_as_ds(lo - 100 * spread))
    if slope > 0 and (rep := _fit(lo, hi, slope, intercept, 0)) is not None:
        return _Rescale(slope, intercept, True, True, rep)
    raise MedsynthError(f"volume values {lo:g}..{hi:g} cannot be stored as 16-bit pixels with a DS rescale")


def _windows(volume: np.ndarray, modality: str) -> tuple[list[str], list[str], list[str]]:
    """Window centres, widths and explanations (in output units) for viewers' first display."""
    lo, hi = np.percentile(volume, [1.0, 99.0])
    data = ((lo + hi) / 2, max(float(hi - lo), 1.0))  # a width below 1 is not allowed
    windows = ([(*_SOFT_TISSUE, "SOFT TISSUE")] if modality == "ct" else []) + [(*data, "DATA P1-P99")]
    return (
        [format_number_as_ds(float(c)) for c, _, _ in windows],
        [format_number_as_ds(float(w)) for _, w, _ in windows],
        [e for _, _, e in windows],
    )


# --- identity ------------------------------------------------------------------------------------


def _identity_digest(volume: np.ndarray, lps: np.ndarray, parts: dict[str, Any]) -> str:
    """sha256 of the synthetic image's identity: same image, same UIDs; another volume, others."""
    sha = hashlib.sha256(b"medsynth synthetic DICOM series v1\0")
    sha.update(json.dumps(parts, sort_keys=True, default=str).encode())
    sha.update(f"{volume.dtype.str} {volume.shape}".encode())
    sha.update(np.ascontiguousarray(volume).data)
    sha.update(np.ascontiguousarray(lps, dtype="<f8").tobytes())
    return sha.hexdigest()


def _uid(digest: str, role: str) -> str:
    # One string: generate_uid joins its entropy sources without a separator.
    return str(generate_uid(entropy_srcs=[f"{digest}/{role}"]))


def _pseudonym(patient_key: str) -> str:
    return hashlib.sha256(f"medsynth synthetic patient\0{patient_key}".encode()).hexdigest()[:10].upper()


# --- one slice -----------------------------------------------------------------------------------


def _series_dataset(
    modality: str,
    *,
    digest: str,
    pseudonym: str,
    description: str,
    series_number: int,
    lps: np.ndarray,
    n_slices: int,
    rescale: _Rescale,
    windows: tuple[list[str], list[str], list[str]],
    provenance_text: str,
    software: list[str],
    created: datetime.datetime,
    body_part: str | None,
    shape: tuple[int, int],
) -> Dataset:
    """The attributes every slice shares."""
    ds = Dataset()
    column_mm, row_mm, _ = np.linalg.norm(lps[:3, :3], axis=0)
    normal = np.cross(lps[:3, 0] / column_mm, lps[:3, 1] / row_mm)
    step = float(abs(lps[:3, 2] @ normal))  # spacing along the normal (= |third column| without shear)
    comments = f"SYNTHETIC image made by medsynth, not a scan of a patient; {provenance_text}"
    derivation = f"medsynth synthetic image (diffusion model sample); {provenance_text}"
    if len(derivation) > _MAX_ST:
        derivation = derivation[: _MAX_ST - 3] + "..."  # ImageComments keeps the full text
    code = codes.DCM.ProcessingEquipment  # CID 7005, Contributing Equipment Purposes of Reference
    equipment = _item(
        Manufacturer="medsynth",
        SoftwareVersions=software,
        ContributionDescription=derivation,
        PurposeOfReferenceCodeSequence=[
            _item(CodeValue=code.value, CodingSchemeDesignator=code.scheme_designator, CodeMeaning=code.meaning)
        ],
    )
    _item(
        ds,
        SOPClassUID=_SOP_CLASS[modality],
        # Patient: a pseudonym that no real patient has.
        PatientName=f"SYNTHETIC^{pseudonym}",
        PatientID=f"MEDSYNTH-{pseudonym}",
        PatientSex="O",
        PatientIdentityRemoved="YES",
        DeidentificationMethod="synthetic image; no source patient",
        # Study, series, frame of reference, equipment.
        StudyInstanceUID=_uid(digest, "study"),
        StudyID="SYNTHETIC",
        StudyDescription="medsynth SYNTHETIC study",
        Modality=modality.upper(),
        SeriesInstanceUID=_uid(digest, "series"),
        SeriesNumber=series_number,
        SeriesDescription=description,
        FrameOfReferenceUID=_uid(digest, "frame-of-reference"),
        Manufacturer="medsynth",
        ManufacturerModelName="medsynth diffusion model",
        SoftwareVersions=software,
        ContributingEquipmentSequence=[equipment],
        # Image: what it is and where it came from.
        ImageType=["DERIVED", "SECONDARY", _IMAGE_TYPE_3[modality]],
        DerivationDescription=derivation,
        ImageComments=comments,
        BurnedInAnnotation="NO",
        LossyImageCompression="00",
        # Plane.
        ImageOrientationPatient=[
            format_number_as_ds(float(v)) for v in (*lps[:3, 0] / column_mm, *lps[:3, 1] / row_mm)
        ],
        PixelSpacing=[format_number_as_ds(float(row_mm)), format_number_as_ds(float(column_mm))],
        SliceThickness=format_number_as_ds(step),
        # Pixels and values.
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        Rows=shape[1],
        Columns=shape[0],
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=rescale.pixel_representation,
        WindowCenter=windows[0],
        WindowWidth=windows[1],
        WindowCenterWidthExplanation=windows[2],
    )
    if n_slices > 1:
        _set(ds, "SpacingBetweenSlices", format_number_as_ds(step))
    if rescale.write_tags:
        _item(
            ds, RescaleSlope=format_number_as_ds(rescale.slope), RescaleIntercept=format_number_as_ds(rescale.intercept)
        )
    if modality == "ct":
        _set(ds, "RescaleType", "HU")
    else:  # Research Mode: no pulse sequence made this image
        _item(ds, ScanningSequence="RM", SequenceVariant="NONE")
    for keyword in _EMPTY + _EMPTY_IOD[modality]:
        _set(ds, keyword, None)
    if body_part is None:  # Type 2C for a paired body part: the part, hence its side, is unknown
        _set(ds, "Laterality", None)
    else:
        _set(ds, "BodyPartExamined", body_part)
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    _item(
        ds,
        StudyDate=date,
        StudyTime=time,
        SeriesDate=date,
        SeriesTime=time,
        ContentDate=date,
        ContentTime=time,
        InstanceCreationDate=date,
        InstanceCreationTime=time,
    )
    _set(equipment, "ContributionDateTime", created.strftime("%Y%m%d%H%M%S"))
    return ds


def _slice_dataset(
    series: Dataset, stored: np.ndarray, *, modality: str, digest: str, k: int, lps: np.ndarray
) -> Dataset:
    ds = Dataset()
    ds.update(series)
    sop_uid = _uid(digest, f"slice {k}")
    position = lps @ np.array([0.0, 0.0, float(k), 1.0])
    _item(
        ds,
        SOPInstanceUID=sop_uid,
        InstanceNumber=k + 1,
        ImagePositionPatient=[format_number_as_ds(float(v)) for v in position[:3]],
    )
    # Row j, column i of the slice is volume[i, j, k]: transpose to row-major (rows, columns).
    _set(ds, "PixelData", np.ascontiguousarray(stored.T).tobytes(), vr="OW")
    ds.file_meta = _item(
        FileMetaDataset(),
        MediaStorageSOPClassUID=_SOP_CLASS[modality],
        MediaStorageSOPInstanceUID=sop_uid,
        TransferSyntaxUID=ExplicitVRLittleEndian,
        ImplementationClassUID=PYDICOM_IMPLEMENTATION_UID,
    )
    ds.preamble = b"\0" * 128
    return ds


# --- the series ----------------------------------------------------------------------------------


def write_synthetic_series(
    volume: np.ndarray,
    affine: np.ndarray,
    output: str | Path,
    *,
    modality: Literal["ct", "mr"],
    provenance: dict[str, Any],
    series_description: str = "medsynth SYNTHETIC",
    patient_key: str | None = None,
    series_number: int = 1,
    instance_prefix: str = "slice",
    created: datetime.datetime | None = None,
    body_part: str | None = None,
) -> list[Path]:
    """Write a synthetic volume as a CT or MR Image DICOM series, one file per slice.

    Args:
        volume: ``(X, Y)`` or ``(X, Y, Z)`` values in the modality's units (CT: HU; MR: any), in the
            voxel order of ``affine``; one file per slice along the last axis.
        affine: 4x4 map from voxel ``(i, j, k, 1)`` to RAS mm (NIfTI style); for 2D its third column
            gives the slice normal and thickness.
        output: the series folder to create (it must not exist, or be empty).
        modality: ``"ct"`` (CT Image Storage) or ``"mr"`` (MR Image Storage).
        provenance: the generation record (``pipelines/augment.py``); ``seed`` and ``model_uri`` or
            ``model_sha256`` are required; the entries in :data:`PROVENANCE_KEYS` are written.
        series_description: SeriesDescription, ASCII, at most 64 characters, containing ``SYNTHETIC``.
        patient_key: any text that names the synthetic patient (e.g. model digest + seed; never a
            real patient's identifier); only a hash of it is written. ``None``: a fresh random one.
        series_number: SeriesNumber, 0..2147483647.
        instance_prefix: file names are ``<instance_prefix>_00001.dcm``...; letters, digits, ``_``, ``-``.
        created: the generation time written as Study/Series/Content/InstanceCreation date and
            time; ``None``: now. Pass a fixed time for byte-identical files (see the module docstring).
        body_part: BodyPartExamined (a DICOM defined term of an unpaired region: HEAD, BRAIN, CHEST,
            ABDOMEN, PELVIS, WHOLEBODY...). ``None``: absent, and Laterality present and empty
            (unknown), which dciodvfy reports as a warning.

    Returns:
        The written files, in slice order (k = 0, 1, ...).

    Raises:
        MedsynthError: bad volume (shape, NaN/Inf), affine (not 4x4, singular, in-plane shear),
            modality, provenance, text or prefix, or ``output`` exists and is not an empty folder.
            Nothing is written then.
    """
    output = _output_folder(output)
    if modality not in MODALITIES:
        raise MedsynthError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    if not isinstance(instance_prefix, str) or not _PREFIX.fullmatch(instance_prefix):
        raise MedsynthError(
            f"instance_prefix {instance_prefix!r}: expected 1-32 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    description = _ascii_text("series_description", series_description, _MAX_LO)
    if "SYNTHETIC" not in description:
        raise MedsynthError(f"series_description {description!r}: expected it to contain 'SYNTHETIC'")
    if (
        isinstance(series_number, bool)
        or not isinstance(series_number, (int, np.integer))
        or not 0 <= series_number <= 2**31 - 1
    ):
        raise MedsynthError(f"series_number {series_number!r}: expected an integer 0..2147483647")
    if created is None:
        created = datetime.datetime.now().replace(microsecond=0)
    if not isinstance(created, datetime.datetime):
        raise MedsynthError(f"created {created!r}: expected a datetime.datetime or None")
    if body_part is not None and not (isinstance(body_part, str) and _BODY_PART.fullmatch(body_part)):
        raise MedsynthError(
            f"body_part {body_part!r}: expected a DICOM code string of 1-16 A-Z, 0-9, '_' or ' ', e.g. HEAD or ABDOMEN"
        )
    volume = _check_volume(volume)
    lps = _lps_affine(affine)
    items = _provenance_items(provenance)
    provenance_text = "; ".join(f"{k}={v}" for k, v in items)
    if patient_key is None:
        patient_key = secrets.token_hex(16)

    rescale = _rescale(volume, modality)
    dtype = np.dtype("<i2" if rescale.pixel_representation else "<u2")
    digest = _identity_digest(volume, lps, {"modality": modality, "provenance": items, "patient_key": str(patient_key)})
    series = _series_dataset(
        modality,
        digest=digest,
        pseudonym=_pseudonym(str(patient_key)),
        description=description,
        series_number=int(series_number),
        lps=lps,
        n_slices=volume.shape[2],
        rescale=rescale,
        windows=_windows(volume, modality),
        provenance_text=provenance_text,
        software=_software_versions(provenance),
        created=created,
        body_part=body_part,
        shape=volume.shape[:2],
    )

    written: list[Path] = []
    previous = config.settings._writing_validation_mode  # raise, not warn, on a bad value; restored below
    config.settings.writing_validation_mode = config.RAISE
    try:
        with staged_folder(output) as work:
            for k in range(volume.shape[2]):
                values = volume[:, :, k].astype(np.float64)
                stored = np.rint((values - rescale.intercept) / rescale.slope).astype(dtype)  # fits: see _fit
                ds = _slice_dataset(series, stored, modality=modality, digest=digest, k=k, lps=lps)
                name = f"{instance_prefix}_{k + 1:05d}.dcm"
                ds.save_as(work / name, enforce_file_format=True)
                written.append(output / name)
    finally:
        config.settings._writing_validation_mode = previous
    return written
