"""Write small, valid DICOM objects for tests: CT series, a non-image object, a broken compressed slice.

Everything here is synthetic. Geometry follows the DICOM patient coordinate system (LPS, mm):
``ImageOrientationPatient`` holds the row direction (the direction in which the column index grows)
followed by the column direction (the direction in which the row index grows), and ``PixelSpacing`` is
``(spacing between rows, spacing between columns)``. A volume ``volume_hu[i, j, k]`` is written as the
pixel at column ``i``, row ``j`` of slice ``k``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = ["slice_normal", "write_ct_series", "write_rt_struct", "write_unsupported_compressed_slice"]

FAKE_PATIENT_NAME = "Test^Patient"
FAKE_PATIENT_ID = "TEST-0001"


# --- helpers -------------------------------------------------------------------------------------


def _ds(values: Sequence[float]) -> list[str]:
    """Format numbers as DICOM decimal strings (at most 16 characters each)."""
    return [format_number_as_ds(float(v)) for v in values]


def _file_name(series_uid: str, index: int) -> str:
    """A file name unique to (series, slice) that says nothing about the slice order."""
    return hashlib.sha1(f"{series_uid}/{index}".encode()).hexdigest()[:16] + ".dcm"


def _base_dataset(sop_class: str, transfer_syntax: str, *, study_uid: str, series_uid: str) -> Dataset:
    """A dataset with file meta, SOP identity, fake patient and study/series identity."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20240101"
    return ds


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The slice normal (row direction x column direction) of an ``ImageOrientationPatient``."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(row, col)


# --- CT image series -----------------------------------------------------------------------------


def write_ct_series(
    folder: str | Path,
    volume_hu: np.ndarray,
    *,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    origin: Sequence[float] = (-100.0, -120.0, 50.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    modality: str = "CT",
    shuffle_files: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
    reverse_instance_numbers: bool = False,
    seed: int = 0,
    identifiers: dict[str, str] | None = None,
    name_prefix: str = "",
) -> list[Path]:
    """Write ``volume_hu`` as a CT Image Storage series, one file per slice.

    Args:
        folder: where to write (created if needed).
        volume_hu: intensities in HU, shape ``(X, Y, Z)``: column ``i``, row ``j``, slice ``k``.
        spacing: ``(column spacing, row spacing, slice spacing)`` in mm, i.e. along ``i``, ``j``, ``k``.
        origin: LPS position (mm) of voxel ``(0, 0, 0)``, the first slice's ``ImagePositionPatient``.
        orientation: ``ImageOrientationPatient``; slice ``k`` lies at ``origin + k * spacing[2] * normal``.
        slope: ``RescaleSlope``; stored values are ``round((hu - intercept) / slope)``.
        intercept: ``RescaleIntercept``.
        series_uid: the ``SeriesInstanceUID``; a new one when ``None``.
        study_uid: the ``StudyInstanceUID``; a new one when ``None``.
        modality: the ``Modality`` tag.
        shuffle_files: write the files in random order (the names never reveal the order).
        transfer_syntax: an uncompressed transfer syntax UID.
        reverse_instance_numbers: number the slices against their spatial order.
        seed: seeds the write order.
        identifiers: extra attributes set on every slice by keyword (e.g. ``{"PatientName": "Doe^Jane",
            "AccessionNumber": "A123"}``), overriding the fake patient.
        name_prefix: prepended to every file name (e.g. a patient's name, as some exporters do).

    Returns:
        The written files in slice order (``k = 0, 1, ...``).
    """
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume_hu must have shape (X, Y, Z), got {volume_hu.shape}")
    stored = np.rint((volume_hu.astype(np.float64) - intercept) / slope)
    if stored.min() >= 0 and stored.max() <= np.iinfo(np.uint16).max:
        dtype, pixel_representation = np.uint16, 0
    elif stored.min() >= np.iinfo(np.int16).min and stored.max() <= np.iinfo(np.int16).max:
        dtype, pixel_representation = np.int16, 1
    else:
        raise ValueError("volume_hu does not fit 16-bit storage with this slope and intercept")
    stored = stored.astype(dtype)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    n_cols, n_rows, n_slices = volume_hu.shape
    normal = slice_normal(orientation)

    datasets: list[Dataset] = []
    for k in range(n_slices):
        ds = _base_dataset(CTImageStorage, transfer_syntax, study_uid=study_uid, series_uid=series_uid)
        ds.Modality = modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = n_slices - k if reverse_instance_numbers else k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = _ds(np.asarray(origin, float) + k * spacing[2] * normal)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds((spacing[1], spacing[0]))
        ds.SliceThickness = format_number_as_ds(float(spacing[2]))
        ds.RescaleSlope = format_number_as_ds(float(slope))
        ds.RescaleIntercept = format_number_as_ds(float(intercept))
        ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_rows
        ds.Columns = n_cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_representation
        # Pixel (row j, column i) of slice k is volume_hu[i, j, k].
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        for keyword, value in (identifiers or {}).items():
            setattr(ds, keyword, value)
        datasets.append(ds)

    paths = [folder / (name_prefix + _file_name(series_uid, k)) for k in range(n_slices)]
    order = list(range(n_slices))
    if shuffle_files:
        rng.shuffle(order)
    for k in order:
        datasets[k].save_as(paths[k], enforce_file_format=True)
    return paths


# --- objects for the error and skip paths --------------------------------------------------------


def write_rt_struct(folder: str | Path, *, study_uid: str | None = None, name: str = "rtstruct.dcm") -> Path:
    """Write an RT Structure Set-like object: valid DICOM, but no image (no Rows, no PixelData)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(
        RTStructureSetStorage,
        ExplicitVRLittleEndian,
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
    )
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel = "Synthetic"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = "Body"
    ds.StructureSetROISequence = [roi]
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_unsupported_compressed_slice(folder: str | Path, *, name: str = "compressed.dcm") -> Path:
    """Write a CT slice that claims JPEG 2000 compression but holds garbage encapsulated bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(CTImageStorage, JPEG2000, study_uid=generate_uid(), series_uid=generate_uid())
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = _ds((0.0, 0.0, 0.0))
    ds.ImageOrientationPatient = _ds((1, 0, 0, 0, 1, 0))
    ds.PixelSpacing = _ds((1.0, 1.0))
    ds.SliceThickness = "1"
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "-1024"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([b"\x00\x01 not a JPEG 2000 codestream \xff" * 4])
    ds["PixelData"].VR = "OB"
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path
