"""Read scans from disk: NIfTI files and DICOM series, validated, as float32 arrays with a RAS affine.

Every reader returns :class:`Volume` objects in one convention, the one nibabel uses for NIfTI:

- ``array`` is spatial only, ``(X, Y)`` or ``(X, Y, Z)``, float32, in the file's voxel order;
- ``affine`` maps voxel indices ``(i, j, k, 1)`` to RAS+ world coordinates in mm.

DICOM stores geometry in the LPS patient system. A series is turned into this convention as
MONAI's ``PydicomReader`` does (with its defaults ``swap_ij=True, affine_lps_to_ras=True``):
``array[i, j, k]`` is the pixel at column ``i`` and row ``j`` of the ``k``-th slice along the slice
normal, and the affine is ``diag(-1, -1, 1, 1) @ affine_lps`` with

    affine_lps[:3, 0] = ImageOrientationPatient[:3] * PixelSpacing[1]   # along a row: column spacing
    affine_lps[:3, 1] = ImageOrientationPatient[3:] * PixelSpacing[0]   # down a column: row spacing
    affine_lps[:3, 2] = (IPP_last - IPP_first) / (n - 1)                # slice step
    affine_lps[:3, 3] = IPP_first

(see https://nipy.org/nibabel/dicom/dicom_orientation.html). Unlike MONAI, slices are ordered by
their position along the normal ``row x column`` rather than by ``InstanceNumber``. Patient
identifiers never leave this module: a Volume carries pixels, geometry and the modality only.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.errors
import pydicom.misc
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as dicom_pixel_array
from pydicom.uid import UID

from medsynth.errors import MedsynthError

__all__ = ["Volume", "find_images", "read_any", "read_dicom_series", "read_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_KINDS = ("nifti", "dicom")

# DICOM Modality -> medsynth modality; anything else is reported as None.
_MODALITIES = {"CT": "ct", "MR": "mr"}
# Objects that carry pixels but are not scans: skipped beside a series, like RT structure sets.
_NON_SCAN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# DICOM LPS -> RAS: negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# The most voxels one scan may hold (4 GiB as float32): a header claiming more is refused before any
# memory is allocated (a 1 KB file can claim 32767^3 voxels).
MAX_VOXELS = 2**30
# Names that say "I am an image": such a file that cannot be read is an error, not something to skip.
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class Volume:
    """One scan in memory.

    Attributes:
        array: float32 intensities, spatial dims only: ``(X, Y)`` or ``(X, Y, Z)``.
        affine: 4x4 float64 map from voxel indices to RAS+ world coordinates (mm).
        source: the file or folder the scan was read from.
        modality: ``"ct"`` or ``"mr"`` when the file says so, else ``None``.
    """

    array: np.ndarray = field(repr=False)
    affine: np.ndarray
    source: str
    modality: str | None = None
    files: list[str] = field(default_factory=list, repr=False)  # DICOM: the slice files, in slice order


# --- helpers -------------------------------------------------------------------------------------


def _reason(exc: BaseException, limit: int = 240) -> str:
    """A short one-line description of an exception for an error message."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_hidden(path: Path) -> bool:
    # Dot files include macOS "._name" resource forks, which look like images by name only.
    return path.name.startswith(".")


def _require_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise MedsynthError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise MedsynthError(f"{folder}: expected a folder of NIfTI files or DICOM series, got a file")
    return folder


def _looks_like_image(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES + DICOM_SUFFIXES)


def _files_in(folder: Path, *, recursive: bool) -> list[Path]:
    """Regular, non-hidden files under ``folder``, sorted, skipping hidden sub-folders.

    Raises:
        MedsynthError: an entry named like an image (``*.nii``, ``*.nii.gz``, ``*.dcm``) that is not a
            readable file, such as a broken symbolic link: skipping it would silently drop a scan.
    """
    if not recursive:
        entries = sorted(p for p in folder.iterdir() if not _is_hidden(p))
    else:
        entries = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            entries.extend(Path(root) / n for n in names if not n.startswith("."))
        entries.sort()
    for entry in entries:
        if _looks_like_image(entry) and not entry.is_file() and not entry.is_dir():
            what = "a broken symbolic link" if entry.is_symlink() else "not a regular file"
            raise MedsynthError(f"{entry}: {what}; expected an image file")
    return [f for f in entries if f.is_file()]


# --- NIfTI ---------------------------------------------------------------------------------------


def read_nifti(path: str | Path, *, max_dims: int = 3) -> Volume:
    """Read one NIfTI file (``.nii`` or ``.nii.gz``) as a validated :class:`Volume`.

    Trailing singleton dimensions beyond ``max_dims`` are dropped, so ``(X, Y, Z, 1)`` reads as 3D
    (and ``(X, Y, 1)`` as 2D when ``max_dims=2``).

    Args:
        path: the NIfTI file.
        max_dims: the most spatial dimensions accepted, 2 or 3.

    Returns:
        The scan with nibabel's affine (sform, else qform) and no modality.

    Raises:
        MedsynthError: the file is missing, not NIfTI, corrupt or truncated, has the wrong number of
            dimensions, or holds NaN/Inf voxels.
    """
    if max_dims not in (2, 3):
        raise ValueError(f"max_dims must be 2 or 3, got {max_dims}")
    path = Path(path)
    if not path.exists():
        raise MedsynthError(f"{path}: file not found")
    if path.is_dir():
        raise MedsynthError(f"{path}: expected a NIfTI file, got a folder")

    # nibabel reads the header eagerly and the voxels lazily. Everything the header can tell (data
    # type, shape, size, geometry) is checked before a voxel is read, so that a header claiming a huge
    # image is refused without allocating it; then the voxels are forced here so that a truncated or
    # corrupt file fails now, with its name, rather than deep inside training.
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):
            raise MedsynthError(f"{path}: expected a NIfTI file, nibabel reads it as {type(img).__name__}")
        dtype = img.get_data_dtype()
        if dtype.names is not None or np.issubdtype(dtype, np.complexfloating) or dtype.kind not in "biuf":
            raise MedsynthError(f"{path}: expected real-valued intensities, got NIfTI data type {dtype}")
        shape = tuple(int(n) for n in img.shape)
        spatial = list(shape)
        while len(spatial) > max_dims and spatial[-1] == 1:
            spatial.pop()
        if not 2 <= len(spatial) <= max_dims:
            expected = "a 2D" if max_dims == 2 else "a 2D or 3D"
            raise MedsynthError(f"{path}: expected {expected} image, got shape {shape}")
        if min(spatial) < 1:
            raise MedsynthError(
                f"{path}: header gives shape {shape} with an empty dimension; expected at least 1 voxel per dimension"
            )
        voxels = int(np.prod(spatial, dtype=object))
        if voxels > MAX_VOXELS:
            raise MedsynthError(
                f"{path}: header claims shape {shape} ({voxels:.3g} voxels); "
                f"expected at most {MAX_VOXELS:.3g} voxels per scan"
            )
        affine = np.array(img.affine, dtype=np.float64)
        array = img.get_fdata(dtype=np.float32).reshape(spatial)
    except MedsynthError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib and EOF errors all mean a broken file
        raise MedsynthError(f"{path}: corrupt or truncated NIfTI file ({_reason(exc)})") from exc

    # The voxel axes must span as many world directions as the image has dimensions (a zero voxel size
    # or a zero sform/qform makes the orientation and spacing undefined).
    axes = affine[:3, : array.ndim]
    if (
        not np.all(np.isfinite(affine))
        or np.linalg.matrix_rank(axes, tol=1e-6 * max(1.0, float(np.abs(axes).max()))) < array.ndim
    ):
        raise MedsynthError(
            f"{path}: degenerate voxel-to-world affine (sform/qform) {affine[:3].tolist()}; expected a finite affine "
            "with non-zero voxel sizes along independent axes"
        )

    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise MedsynthError(f"{path}: contains {n_bad} NaN/Inf voxels; expected finite intensities")
    return Volume(array=np.ascontiguousarray(array), affine=affine, source=str(path), modality=None)


# --- DICOM: classifying files --------------------------------------------------------------------


def _read_dicom_header(path: Path) -> Dataset | None:
    """The header of a DICOM file without its pixels, or ``None`` when the file is not DICOM.

    A file that says it is DICOM (the ``DICM`` marker, or a ``.dcm`` name) but cannot be read, or
    whose header has no SOP Class (a Type 1 attribute of every DICOM file: pydicom reads a file cut
    short as an empty header without complaint), is an error, never silently skipped.
    """
    try:
        if not pydicom.misc.is_dicom(path):
            if path.name.lower().endswith(DICOM_SUFFIXES):
                raise MedsynthError(
                    f"{path}: not a DICOM file (no 'DICM' marker at byte 128, size {path.stat().st_size} bytes); "
                    "expected a DICOM Part 10 file"
                )
            return None
    except OSError as exc:
        raise MedsynthError(f"{path}: cannot read file ({exc.strerror or _reason(exc)})") from exc
    try:
        with warnings.catch_warnings():
            # pydicom warns about each odd value it meets; what matters is reported below, in one line.
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise MedsynthError(f"{path}: corrupt DICOM file ({_reason(exc)})") from exc
    if len(header) == 0 or not UID(_sop_class(header)).is_valid:
        raise MedsynthError(
            f"{path}: corrupt or truncated DICOM file (no SOP Class UID in {path.stat().st_size} bytes); "
            "expected a complete DICOM file"
        )
    return header


def _sop_class(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    uid = header.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return str(uid or "")


def _is_scan_slice(header: Dataset) -> bool:
    """Whether a DICOM header (read without pixels) describes an image of a scan.

    RT structure sets, SR reports, DICOMDIR files and the like have no image attributes and are
    not scans; segmentations and dose grids carry pixels but are not scans either. An object that
    claims an image SOP class or image attributes counts as a slice even when its pixels are missing,
    so that a damaged slice is reported instead of silently dropped.
    """
    sop_class = _sop_class(header)
    if sop_class in _NON_SCAN_SOP_CLASSES:
        return False
    if "Rows" in header or any(k in header for k in _PIXEL_KEYWORDS):
        return True
    return "Image Storage" in UID(sop_class).name if sop_class else False


def _folder_has_dicom_images(folder: Path) -> bool:
    for path in _files_in(folder, recursive=False):
        if _is_nifti_name(path):
            continue
        header = _read_dicom_header(path)
        if header is not None and _is_scan_slice(header):
            return True
    return False


# --- DICOM: one series ---------------------------------------------------------------------------


def _transfer_syntax(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"transfer syntax {uid.name} ({uid})" if uid else "unknown transfer syntax"


def _floats(path: Path, header: Dataset, keyword: str, count: int) -> np.ndarray | None:
    """A numeric multi-value tag as floats, ``None`` when absent; wrong length is an error."""
    value = header.get(keyword)
    if value is None or value == "":
        return None
    try:
        values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        values = np.full(0, np.nan)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise MedsynthError(f"{path}: {keyword} must be {count} finite numbers, got {value!r}")
    return values


def _check_same(files: list[Path], values: list, what: str, *, atol: float = 0.0) -> None:
    """Raise naming the first file whose ``values`` entry differs from the first one."""
    for path, value in zip(files[1:], values[1:]):
        same = value == values[0] if atol == 0.0 else np.allclose(value, values[0], atol=atol)
        if not same:
            raise MedsynthError(
                f"{path}: {what} {value} differs from {values[0]} in {files[0].name} of the same series; "
                "expected one value per series"
            )


def _orientation(files: list[Path], headers: list[Dataset]) -> np.ndarray:
    """The series' ImageOrientationPatient, checked for consistency and orthonormality."""
    orientations = [_floats(f, h, "ImageOrientationPatient", 6) for f, h in zip(files, headers)]
    present = [o is not None for o in orientations]
    if not any(present):
        return np.asarray(_DEFAULT_ORIENTATION)
    if not all(present):
        missing = files[present.index(False)]
        raise MedsynthError(f"{missing}: ImageOrientationPatient missing; expected it on every slice of the series")
    _check_same(files, [tuple(map(float, o)) for o in orientations], "ImageOrientationPatient", atol=1e-4)
    orientation = orientations[0]
    row, col = orientation[:3], orientation[3:]
    # A loose tolerance: scanners write the cosines with as few as 4-6 decimals.
    unit = abs(np.linalg.norm(row) - 1) < 1e-2 and abs(np.linalg.norm(col) - 1) < 1e-2
    if not (unit and abs(row @ col) < 1e-2):
        raise MedsynthError(
            f"{files[0]}: ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors"
        )
    return orientation


def _slice_order(files: list[Path], headers: list[Dataset], normal: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Order the slices along ``normal``; fall back to InstanceNumber when no slice has a position.

    Returns:
        The order (indices into ``files``) and the positions (LPS, mm) in that order, or ``None``.
    """
    positions = [_floats(f, h, "ImagePositionPatient", 3) for f, h in zip(files, headers)]
    present = [p is not None for p in positions]
    if all(present):
        ipp = np.stack(positions)
        along = ipp @ normal
        order = np.argsort(along, kind="stable")
        steps = np.diff(along[order])
        for n, step in enumerate(steps):
            if step < 1e-3:
                first, second = files[order[n]], files[order[n + 1]]
                raise MedsynthError(
                    f"{second}: same slice position ({along[order[n]]:.3f} mm along the slice normal) as "
                    f"{first.name} in the same series; expected one slice per position"
                )
        if len(steps) > 1 and np.ptp(steps) > 0.01 * steps.mean() + 1e-3:
            raise MedsynthError(
                f"{files[order[0]].parent}: slice spacing varies from {steps.min():.3f} to "
                f"{steps.max():.3f} mm in one series; expected evenly spaced slices (a slice may be missing)"
            )
        return order, ipp[order]
    if any(present):
        missing = files[present.index(False)]
        raise MedsynthError(f"{missing}: ImagePositionPatient missing; expected it on every slice of the series")

    numbers = [h.get("InstanceNumber") for h in headers]
    if len(files) > 1:
        if any(n is None or n == "" for n in numbers):
            missing = files[[n is None or n == "" for n in numbers].index(True)]
            raise MedsynthError(
                f"{missing}: neither ImagePositionPatient nor InstanceNumber; cannot order the slices of the series"
            )
        if len(set(int(n) for n in numbers)) != len(numbers):
            raise MedsynthError(
                f"{files[0].parent}: slices without ImagePositionPatient share an InstanceNumber; "
                "expected one slice per InstanceNumber"
            )
        return np.argsort([int(n) for n in numbers], kind="stable"), None
    return np.zeros(1, dtype=int), None


def _slice_step(header: Dataset) -> float:
    """The slice spacing (mm) of a series whose positions do not give it."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = header.get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return 1.0


def _read_slice(path: Path, header: Dataset) -> np.ndarray:
    """Decode one slice and apply its rescale (or modality LUT), as float32 ``(rows, columns)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings about odd values; failures are reported below
            stored = dicom_pixel_array(path)
            values = apply_modality_lut(stored, header)
    except MemoryError:
        raise
    except Exception as exc:
        raise MedsynthError(
            f"{path}: cannot decode the pixel data ({_transfer_syntax(header)}): {_reason(exc)}"
        ) from exc
    if values.shape != (header.Rows, header.Columns):
        raise MedsynthError(
            f"{path}: pixel data has shape {values.shape}; expected one slice of "
            f"{header.Rows} rows x {header.Columns} columns"
        )
    return values.astype(np.float32, copy=False)


def _read_series(files: list[Path], headers: list[Dataset]) -> Volume:
    """Stack one series' slices into a :class:`Volume` (see the module docstring for the geometry)."""
    for path, header in zip(files, headers):
        if "Rows" not in header or "Columns" not in header:
            raise MedsynthError(f"{path}: image without Rows/Columns; expected a complete image header")
        frames = int(header.get("NumberOfFrames") or 1)
        if frames != 1:
            raise MedsynthError(
                f"{path}: multi-frame DICOM ({frames} frames) is not supported; expected one slice per file"
            )
        samples = int(header.get("SamplesPerPixel") or 1)
        if samples != 1:
            raise MedsynthError(f"{path}: colour image ({samples} samples per pixel); expected a greyscale scan")
    _check_same(files, [(int(h.Rows), int(h.Columns)) for h in headers], "(Rows, Columns)")
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    if rows < 1 or cols < 1:
        raise MedsynthError(f"{files[0]}: Rows x Columns is {rows} x {cols}; expected at least one pixel")
    if rows * cols * len(files) > MAX_VOXELS:
        raise MedsynthError(
            f"{files[0]}: series of {len(files)} slices of {rows} x {cols} pixels "
            f"({rows * cols * len(files):.3g} voxels); "
            f"expected at most {MAX_VOXELS:.3g} voxels per scan"
        )
    spacings = [_floats(f, h, "PixelSpacing", 2) for f, h in zip(files, headers)]
    spacings = [tuple(map(float, s)) if s is not None else (1.0, 1.0) for s in spacings]
    _check_same(files, spacings, "PixelSpacing", atol=1e-4)
    row_spacing, col_spacing = spacings[0]

    orientation = _orientation(files, headers)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    order, positions = _slice_order(files, headers, normal)
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]

    if positions is not None and len(files) > 1:
        step = (positions[-1] - positions[0]) / (len(files) - 1)
    else:
        step = normal * _slice_step(headers[0])
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0] if positions is not None else 0.0

    array = np.empty((cols, rows, len(files)), dtype=np.float32)
    for k, (path, header) in enumerate(zip(files, headers)):
        # pixel_array is (rows, columns); the volume is indexed (column, row, slice).
        array[:, :, k] = _read_slice(path, header).T

    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise MedsynthError(f"{files[0].parent}: series contains {n_bad} NaN/Inf voxels; expected finite intensities")

    parents = {str(f.parent) for f in files}
    source = parents.pop() if len(parents) == 1 else os.path.commonpath([str(f.parent) for f in files])
    modality = _MODALITIES.get(str(headers[0].get("Modality", "")).upper())
    return Volume(
        array=array, affine=_LPS_TO_RAS @ affine_lps, source=source, modality=modality, files=[str(f) for f in files]
    )


# --- DICOM: a folder -----------------------------------------------------------------------------


def read_dicom_series(folder: str | Path, *, recursive: bool = True) -> list[Volume]:
    """Read every DICOM image series in a folder, one :class:`Volume` per ``SeriesInstanceUID``.

    Files that are not DICOM (README, hidden files) and DICOM objects that are not scans (RT
    structure sets, SR reports, DICOMDIR, segmentations, dose grids) are skipped. Everything wrong
    with an image series is an error: undecodable or missing pixel data, slices that disagree on
    size, spacing or orientation, two slices at one position, uneven slice spacing.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders (slices of one series may then come from several folders).

    Returns:
        The series, ordered by folder, SeriesNumber and file name.

    Raises:
        MedsynthError: the folder is missing or holds no image series, or a series is broken.
    """
    folder = _require_folder(folder)
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in _files_in(folder, recursive=recursive):
        if _is_nifti_name(path):
            continue
        header = _read_dicom_header(path)
        if header is None or not _is_scan_slice(header):
            continue
        if "Rows" not in header or "Columns" not in header:  # reported by file, before any series check
            raise MedsynthError(f"{path}: image without Rows/Columns; expected a complete image header")
        series[str(header.get("SeriesInstanceUID", ""))].append((path, header))
    if not series:
        raise MedsynthError(f"{folder}: holds no DICOM image series")

    volumes = []
    for members in series.values():
        files, headers = [m[0] for m in members], [m[1] for m in members]
        number = headers[0].get("SeriesNumber")
        key = (str(files[0].parent), int(number) if number not in (None, "") else 2**31, str(files[0]))
        volumes.append((key, _read_series(files, headers)))
    return [volume for _, volume in sorted(volumes, key=lambda kv: kv[0])]


# --- a folder of any images ----------------------------------------------------------------------


def find_images(folder: str | Path) -> list[tuple[str, Path]]:
    """List the images under a folder (recursively), without reading their voxels.

    Args:
        folder: the folder to scan. Hidden files and folders (names starting with ``.``) are ignored.

    Returns:
        ``("nifti", file)`` for each ``*.nii`` / ``*.nii.gz`` file and ``("dicom", folder)`` for each
        folder that directly holds DICOM image files, sorted by path.

    Raises:
        MedsynthError: the folder is missing, is a file, or holds no images.
    """
    root = _require_folder(folder)
    files = _files_in(root, recursive=True)
    found = [("nifti", path) for path in files if _is_nifti_name(path)]
    folders = sorted({path.parent for path in files if not _is_nifti_name(path)})
    found.extend(("dicom", d) for d in folders if _folder_has_dicom_images(d))
    if not found:
        raise MedsynthError(f"{root}: holds no NIfTI files or DICOM series; expected *.nii, *.nii.gz or DICOM images")
    return sorted(found, key=lambda item: (str(item[1]), item[0]))


def read_any(kind: str, path: Path) -> list[Volume]:
    """Read one entry of :func:`find_images`.

    A ``"dicom"`` folder is read without its sub-folders, which :func:`find_images` lists on their own.

    Args:
        kind: ``"nifti"`` or ``"dicom"``.
        path: the NIfTI file or the DICOM folder.

    Returns:
        One Volume for a NIfTI file; one per series for a DICOM folder.
    """
    if kind == "nifti":
        return [read_nifti(path)]
    if kind == "dicom":
        return read_dicom_series(path, recursive=False)
    raise MedsynthError(f"{path}: unknown image kind {kind!r}; expected one of {', '.join(IMAGE_KINDS)}")
