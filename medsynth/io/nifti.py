"""Writing NIfTI images atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.io.atomic import atomic_write


def write_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: type | None = None,
    description: str | None = None,
) -> Path:
    """Write ``array`` (spatial axes only) with ``affine`` as a NIfTI-1 file, atomically.

    Args:
        path: ``*.nii.gz`` or ``*.nii``.
        array: 2D or 3D array in RAS+ voxel order.
        affine: 4x4 voxel-to-world (mm) matrix.
        dtype: on-disk dtype (default: the array's).
        description: short text for the header's ``descrip`` field (max 80 bytes).
    """
    path = Path(path)
    data = np.asarray(array if dtype is None else array.astype(dtype))
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    if description:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    # nibabel picks the format from the file name, so the temporary file ends in the suffix too.
    return atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=suffix)


def spacing_affine(
    spacing: tuple[float, ...] | list[float], shape: tuple[int, ...], *, signs: tuple[float, ...] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """A RAS affine with the given voxel spacing whose world origin is the grid centre.

    Args:
        spacing: voxel size per axis, mm.
        shape: the grid (2 or 3 sides).
        signs: +1 where the array axis runs along +R/+A/+S, -1 where it runs the other way.
    """
    spacing = list(spacing) + [1.0] * (3 - len(spacing))
    size = list(shape) + [1] * (3 - len(shape))
    steps = [s * d for s, d in zip(spacing, signs)]
    affine = np.diag([*steps, 1.0]).astype(np.float64)
    affine[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(size, steps)]
    return affine
