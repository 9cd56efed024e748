"""Write a processed volume back as a derived DICOM series beside its source.

Each output slice is the source slice's own header with new pixels: patient, study, frame of
reference, equipment and geometry are kept, so a viewer overlays the derived series on the source.
What no longer holds is replaced (series and instance identity, image type, pixel description) or
removed (pixel statistics, padding, icons, private tags, signatures). Nothing is invented: every
other attribute comes from the source header of the same slice, and Type 2 attributes of the CT/MR
Image IODs that the source lacks are added empty (present, value unknown), as the standard requires.

Pixels are written uncompressed (Explicit VR Little Endian), 16 bits, and the values keep their
units through RescaleSlope/RescaleIntercept (see :func:`_choose_rescale`). The series appears in
``output`` complete or not at all.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medsynth.errors import MedsynthError
from medsynth.io.atomic import staged_folder

__all__ = ["write_derived_series"]

DESCRIPTION_SUFFIX = " (denoised)"
_MAX_LO, _MAX_ST = 64, 1024
# Attributes of the source that describe its pixels or its file, not the derived ones.
_STALE = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "IconImageSequence",
    "NumberOfFrames",
    "FrameIncrementPointer",
    "PlanarConfiguration",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
    "PixelDataProviderURL",
    "DerivationCodeSequence",
    "SourceImageSequence",
    "ModalityLUTSequence",
    "RealWorldValueMappingSequence",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "StorageMediaFileSetID",
    "StorageMediaFileSetUID",
    "RescaleSlope",
    "RescaleIntercept",
)
# Compressed transfer syntaxes that never lose information; any other compressed one may have.
_LOSSLESS = {
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.110",
}
_INT16, _UINT16 = np.iinfo(np.int16), np.iinfo(np.uint16)
# Type 2 attributes of the CT Image and MR Image IODs (PS3.3 A.3, A.4: Patient, General Study, Frame
# of Reference, General Equipment, Image Plane, CT/MR Image modules). They must be present but may be
# empty ("unknown"); a source that lacks one gets it empty, so the derived series is valid even where
# the source was not. Nothing is invented: an empty value claims nothing.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PositionReferenceIndicator",
    "Manufacturer",
    "SliceThickness",
)
_TYPE2_IOD = {
    "1.2.840.10008.5.1.4.1.1.2": ("KVP", "AcquisitionNumber"),  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4": (
        "ScanOptions",
        "MRAcquisitionType",
        "EchoTime",
        "EchoTrainLength",
    ),  # MR Image Storage
}


@dataclass(frozen=True)
class _Rescale:
    """How values become stored pixels: ``stored = round((value - intercept) / slope)``."""

    slope: float
    intercept: float
    write_tags: bool  # False: the source had no rescale and the values fit as they are
    new_tags: bool  # True: slope/intercept differ from the source's, write them as DS
    pixel_representation: int  # 0 uint16, 1 int16


def _set(ds: Dataset, keyword: str, value: Any, vr: str | None = None) -> None:
    """Set one attribute, validating the value against its VR (raise, never warn)."""
    # Dataset.__setattr__ validates with the *reading* mode (warn by default) in pydicom 3, so
    # build the element here to get an error for any value this module produces.
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, vr or dictionary_VR(tag), value, validation_mode=config.RAISE)


def _item(dataset: Dataset | None = None, **values: Any) -> Dataset:
    """A (sequence item) dataset with validated values."""
    dataset = Dataset() if dataset is None else dataset
    for keyword, value in values.items():
        _set(dataset, keyword, value)
    return dataset


def _ascii_text(what: str, text: str, limit: int) -> str:
    """One line of printable ASCII, so it encodes in any SpecificCharacterSet of the source."""
    text = " ".join(str(text).split())
    if not text or not all(" " <= c <= "~" for c in text) or "\\" in text:
        raise MedsynthError(f"{what} {text!r}: expected non-empty printable ASCII text without backslashes")
    if len(text) > limit:
        raise MedsynthError(f"{what} {text[:40]!r}...: {len(text)} characters; at most {limit} allowed")
    return text


def _read_sources(source_files: Sequence[str | Path]) -> list[Dataset]:
    """The source headers (no pixels), checked to form one single-frame greyscale series."""
    if not source_files:
        raise MedsynthError("no source slices given; expected the files of the source series in slice order")
    headers = []
    for path in source_files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # missing, unreadable or not DICOM: all a bad input path
            raise MedsynthError(f"{path}: cannot read the DICOM header ({type(exc).__name__}: {exc})") from exc
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns") if not header.get(k)]
        if missing:
            raise MedsynthError(f"{path}: source slice without {', '.join(missing)}; expected an image header")
        if int(header.get("SamplesPerPixel") or 1) != 1 or int(header.get("NumberOfFrames") or 1) != 1:
            raise MedsynthError(f"{path}: expected a single-frame greyscale source slice")
        headers.append(header)
    if len({str(h.get("SeriesInstanceUID", "")) for h in headers}) != 1:
        raise MedsynthError(f"{source_files[0]}: source slices belong to several series; expected one series")
    if len({str(h.SOPInstanceUID) for h in headers}) != len(headers):
        raise MedsynthError(f"{source_files[0]}: a source slice is listed twice; expected each slice once")
    return headers


def _check_array(array: np.ndarray, headers: list[Dataset], source_files: Sequence[str | Path]) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3 or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MedsynthError(
            f"array has shape {array.shape} and dtype {array.dtype}; expected a real 3D (X, Y, Z) volume"
        )
    for path, h in zip(source_files, headers):
        expected = (int(h.Columns), int(h.Rows), len(headers))
        if array.shape != expected:
            raise MedsynthError(
                f"array has shape {array.shape}; expected (Columns, Rows, slices) = {expected} from the source {path}"
            )
    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise MedsynthError(f"array contains {n_bad} NaN/Inf voxels; expected finite values")
    return array


def _source_rescale(header: Dataset) -> tuple[float, float] | None:
    slope, intercept = header.get("RescaleSlope"), header.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        return None  # pydicom applies a rescale only when both are present
    return float(slope), float(intercept)


def _fit(lo: float, hi: float, slope: float, intercept: float, prefer: int) -> int | None:
    """The PixelRepresentation (source's first) that holds the stored range, or None."""
    low, high = np.rint((lo - intercept) / slope), np.rint((hi - intercept) / slope)
    for rep in (prefer, 1 - prefer):
        info = _INT16 if rep else _UINT16
        if info.min <= low and high <= info.max:
            return rep
    return None


def _choose_rescale(array: np.ndarray, headers: list[Dataset]) -> _Rescale:
    """Pick slope/intercept for the whole series so that the values survive 16-bit storage.

    - Source with one RescaleSlope <= 1 and RescaleIntercept (CT): keep them when the stored range
      fits int16 or uint16; the rounding error is then at most slope/2, the source's own precision.
    - Source without rescale tags (MR): store rounded values without tags when they fit.
    - Otherwise (values out of range, slope > 1, slopes varying by slice): new tags, first with the
      source's precision (slope min(1, source slopes)) and the intercept at the lowest value, and if
      the range still does not fit, the finest slope that spreads it over 16 bits. MR Image objects
      may carry RescaleSlope/RescaleIntercept and readers (pydicom, MONAI) apply them.
    """
    lo, hi = float(array.min()), float(array.max())
    prefer = int(headers[0].get("PixelRepresentation") or 0)
    rescales = [_source_rescale(h) for h in headers]
    present = [r for r in rescales if r is not None]
    # CT Image requires the rescale tags (type 1), so a CT source always gets them.
    tags_required = bool(present) or str(headers[0].SOPClassUID) == CTImageStorage
    candidates: list[tuple[float, float, bool]] = []  # slope, intercept, new
    if not present:
        candidates.append((1.0, 0.0, tags_required))
    elif len(set(rescales)) == 1:
        slope, intercept = present[0]
        candidates.append((slope, intercept, False) if 0 < slope <= 1 else (1.0, intercept, True))
    precision = min([1.0] + [s for s, _ in present if s > 0])
    candidates.append((precision, lo, True))
    spread = (hi - lo) / (_UINT16.max - 535)  # a margin for the DS rounding of slope and intercept
    candidates.append((spread, lo - 100 * spread, True))
    for slope, intercept, new in candidates:
        if new:  # round-trip through the DS text that is written, so we quantise with what is read
            slope, intercept = float(format_number_as_ds(slope)), float(format_number_as_ds(intercept))
        if slope > 0 and (rep := _fit(lo, hi, slope, intercept, prefer)) is not None:
            return _Rescale(slope, intercept, tags_required or new, new, rep)
    # Only reached when DS text (16 characters) cannot place the values, e.g. 1e12 +- 1.
    raise MedsynthError(f"array values {lo:g}..{hi:g} cannot be stored as 16-bit pixels with a DS rescale")


def _lossy(header: Dataset) -> bool:
    """Whether the source pixels were ever lossy compressed (the derived ones inherit that)."""
    flag = str(header.get("LossyImageCompression", "") or "")
    if flag:
        return flag == "01"
    meta = getattr(header, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    return bool(syntax) and syntax.is_compressed and str(syntax) not in _LOSSLESS


def _derive_slice(
    ds: Dataset,
    stored: np.ndarray,
    rescale: _Rescale,
    *,
    series_uid: str,
    series_number: int,
    description: str,
    derivation: str,
    instance: int,
    now: datetime.datetime,
) -> Dataset:
    """Turn one source header (modified in place) into the derived slice's dataset."""
    source_class, source_uid = UID(str(ds.SOPClassUID)), str(ds.SOPInstanceUID)
    old_type = ds.get("ImageType") or []
    old_type = list(old_type) if isinstance(old_type, (MultiValue, list)) else [str(old_type)]
    lossy = _lossy(ds)
    keep_rescale = not rescale.new_tags and rescale.write_tags
    kept = {k: ds[k] for k in ("RescaleSlope", "RescaleIntercept") if keep_rescale and k in ds}

    # Private tags may describe the original pixels (vendor scaling, statistics): drop them all.
    ds.remove_private_tags()
    for keyword in _STALE:
        if keyword in ds:
            del ds[keyword]
    for element in kept.values():  # the source's own DS text, unchanged
        ds[element.tag] = element
    if rescale.new_tags:
        _set(ds, "RescaleSlope", format_number_as_ds(rescale.slope))
        _set(ds, "RescaleIntercept", format_number_as_ds(rescale.intercept))
    if not rescale.write_tags and "RescaleType" in ds:
        del ds["RescaleType"]

    sop_uid = generate_uid()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    # The purpose code comes from pydicom's copy of the DICOM code tables (CID 7202, DCM 121322).
    code = codes.DCM.SourceImageForImageProcessingOperation
    purpose = _item(CodeValue=code.value, CodingSchemeDesignator=code.scheme_designator, CodeMeaning=code.meaning)
    reference = _item(
        ReferencedSOPClassUID=source_class,
        ReferencedSOPInstanceUID=source_uid,
        PurposeOfReferenceCodeSequence=[purpose],
    )
    _item(
        ds,
        SOPInstanceUID=sop_uid,
        SeriesInstanceUID=series_uid,
        SeriesNumber=series_number,
        SeriesDescription=description,
        InstanceNumber=instance,
        SeriesDate=date,
        SeriesTime=time,
        ContentDate=date,
        ContentTime=time,
        InstanceCreationDate=date,
        InstanceCreationTime=time,
        ImageType=["DERIVED", "SECONDARY"] + [str(v) for v in old_type[2:3] if str(v)],
        DerivationDescription=derivation,
        SourceImageSequence=[reference],
    )

    for keyword in _TYPE2 + _TYPE2_IOD.get(str(source_class), ()):
        if keyword not in ds:
            _set(ds, keyword, None)
    # Type 2C, required for CT and MR images unless a patient orientation code is given.
    if "PatientOrientationCodeSequence" not in ds and "PatientPosition" not in ds:
        _set(ds, "PatientPosition", None)

    if lossy:  # the lossy history (ratio, method) stays true for pixels computed from lossy ones
        _set(ds, "LossyImageCompression", "01")
    else:
        _set(ds, "LossyImageCompression", "00")
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in ds:
                del ds[keyword]

    _item(
        ds,
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        Rows=stored.shape[1],
        Columns=stored.shape[0],
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=rescale.pixel_representation,
    )
    # Row j, column i of the slice is array[i, j, k]: transpose to row-major (rows, columns).
    _set(ds, "PixelData", np.ascontiguousarray(stored.T).tobytes(), vr="OW")

    ds.file_meta = _item(
        FileMetaDataset(),
        MediaStorageSOPClassUID=source_class,
        MediaStorageSOPInstanceUID=sop_uid,
        TransferSyntaxUID=ExplicitVRLittleEndian,
        ImplementationClassUID=PYDICOM_IMPLEMENTATION_UID,
    )
    ds.preamble = b"\0" * 128  # the source preamble may hold non-DICOM data (TIFF headers)
    return ds


def write_derived_series(
    output: str | Path,
    array: np.ndarray,
    source_files: Sequence[str | Path],
    *,
    derivation: str,
    series_description: str | None = None,
    series_number: int | None = None,
) -> list[Path]:
    """Write ``array`` as a derived DICOM series of the source slices, one file per slice.

    Args:
        output: the folder to create (it must not exist, or be empty). Files are ``IM00001.dcm``...
        array: ``(X, Y, Z)`` values in the source's units (HU for CT), the shape of the source
            :class:`~medsynth.io.volumes.Volume`: ``array[i, j, k]`` is column i, row j of slice k.
        source_files: the source slices in slice order, as in ``Volume.files``.
        derivation: how the values were derived, stored as DerivationDescription (cut at 1024).
        series_description: default: the source's SeriesDescription + ``" (denoised)"``, 64 chars.
        series_number: default: the source's SeriesNumber + 1000 (1000 without one).

    Returns:
        The written files, in slice order.

    Raises:
        MedsynthError: bad array (shape, NaN/Inf), unreadable or inconsistent source slices, bad
            text, or ``output`` exists and is not an empty folder. Nothing is written then.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MedsynthError(f"{output}: already exists and is not an empty folder; expected a new output folder")
    derivation = _ascii_text("derivation", " ".join(str(derivation).split())[:_MAX_ST], _MAX_ST)
    headers = _read_sources(source_files)
    array = _check_array(array, headers, source_files)
    if series_description is None:
        base = " ".join(str(headers[0].get("SeriesDescription", "") or "").split())
        # The source text is in the source's character set, which the copied header declares.
        series_description = (base[: _MAX_LO - len(DESCRIPTION_SUFFIX)] + DESCRIPTION_SUFFIX).strip()
    else:
        series_description = _ascii_text("series_description", series_description, _MAX_LO)
    if series_number is None:
        source_number = headers[0].get("SeriesNumber")
        series_number = (int(source_number) if source_number not in (None, "") else 0) + 1000
    if not 0 <= int(series_number) <= 2**31 - 1:
        raise MedsynthError(f"series_number {series_number}: expected 0..2147483647")
    rescale = _choose_rescale(array, headers)
    dtype = np.dtype("<i2" if rescale.pixel_representation else "<u2")
    series_uid, now = generate_uid(), datetime.datetime.now()

    written: list[Path] = []
    # Raise, not warn, on what the writer finds (e.g. text the character set cannot encode). The raw
    # setting is saved, as pydicom's own disable_value_validation() does, so "unset" stays unset.
    previous = config.settings._writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        with staged_folder(output) as work:
            for k, (path, header) in enumerate(zip(source_files, headers)):
                stored = np.rint((array[:, :, k].astype(np.float64) - rescale.intercept) / rescale.slope).astype(dtype)
                ds = _derive_slice(
                    header,
                    stored,
                    rescale,
                    series_uid=series_uid,
                    series_number=int(series_number),
                    description=series_description,
                    derivation=derivation,
                    instance=k + 1,
                    now=now,
                )
                name = f"IM{k + 1:05d}.dcm"
                try:
                    ds.save_as(work / name, enforce_file_format=True)
                except (ValueError, UnicodeError) as exc:  # a source value that cannot be re-encoded
                    raise MedsynthError(
                        f"{path}: cannot write the derived slice ({type(exc).__name__}: {exc})"
                    ) from exc
                written.append(output / name)
    finally:
        config.settings._writing_validation_mode = previous
    return written
