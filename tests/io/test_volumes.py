"""Tests for medsynth.io.volumes: NIfTI and DICOM round trips, geometry, and the user errors."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_factory import (  # noqa: E402
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    slice_normal,
    write_ct_series,
    write_rt_struct,
    write_unsupported_compressed_slice,
)

from medsynth.errors import MedsynthError  # noqa: E402
from medsynth.io.volumes import Volume, find_images, read_any, read_dicom_series, read_nifti  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIAL = (1, 0, 0, 0, 1, 0)


# --- helpers -------------------------------------------------------------------------------------


def rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    """A rotation about x then z, for oblique geometry."""
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def oblique_orientation() -> tuple[float, ...]:
    r = rotation(30.0, 20.0)
    return tuple(r[:, 0]) + tuple(r[:, 1])


def expected_ras_affine(spacing, origin, orientation) -> np.ndarray:
    """The RAS affine of a series written by ``write_ct_series`` (built from its parameters)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[0]
    lps[:3, 1] = col * spacing[1]
    lps[:3, 2] = slice_normal(orientation) * spacing[2]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def hu_volume(shape=(12, 10, 6), *, step: float = 1.0, seed: int = 0) -> np.ndarray:
    """Random HU values on a grid of ``step`` (so that they are exact after rescaling)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3000, size=shape) * step - 1024.0


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def nifti_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(10.0, -25.0) @ np.diag([0.9, 1.1, 2.0])
    affine[:3, 3] = (-90.0, 12.5, 40.0)
    return affine


# --- NIfTI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path, shape, suffix):
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    path = save_nifti(tmp_path / f"scan{suffix}", array, nifti_affine())

    volume = read_nifti(path)

    assert volume.array.dtype == np.float32
    assert volume.array.shape == shape
    np.testing.assert_array_equal(volume.array, array)
    assert volume.affine.shape == (4, 4) and volume.affine.dtype == np.float64
    np.testing.assert_allclose(volume.affine, nifti_affine(), atol=1e-5)  # sform is stored as float32
    assert volume.source == str(path)
    assert volume.modality is None


def test_nifti_integer_data_with_scaling_reads_as_float32(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(array, np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)
    nib.save(img, tmp_path / "scaled.nii.gz")

    volume = read_nifti(tmp_path / "scaled.nii.gz")

    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, array * 0.5 - 10.0)


def test_nifti_trailing_singleton_is_squeezed_to_3d(tmp_path):
    path = save_nifti(tmp_path / "one_channel.nii.gz", np.ones((8, 8, 8, 1), np.float32))
    assert read_nifti(path).array.shape == (8, 8, 8)


def test_nifti_single_slice_3d_reads_as_2d_when_asked(tmp_path):
    path = save_nifti(tmp_path / "slice.nii.gz", np.ones((8, 6, 1), np.float32))
    assert read_nifti(path).array.shape == (8, 6, 1)
    assert read_nifti(path, max_dims=2).array.shape == (8, 6)


def test_nifti_missing_file(tmp_path):
    path = tmp_path / "nothing.nii.gz"
    with pytest.raises(MedsynthError, match="file not found") as err:
        read_nifti(path)
    assert str(path) in str(err.value)


def test_nifti_text_file_with_nifti_name(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(MedsynthError, match="corrupt or truncated NIfTI") as err:
        read_nifti(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_truncated(tmp_path, suffix):
    array = np.random.default_rng(2).normal(size=(16, 16, 16)).astype(np.float32)
    path = save_nifti(tmp_path / f"cut{suffix}", array)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(MedsynthError, match="corrupt or truncated NIfTI") as err:
        read_nifti(path)
    assert str(path) in str(err.value)


def test_nifti_truncated_gzip_of_valid_header(tmp_path):
    # The gzip stream stops inside the voxels: the header parses, only the data read fails.
    array = np.random.default_rng(3).normal(size=(16, 16, 16)).astype(np.float32)
    raw = save_nifti(tmp_path / "full.nii", array).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(raw)[:-2000])
    with pytest.raises(MedsynthError, match="corrupt or truncated NIfTI") as err:
        read_nifti(path)
    assert str(path) in str(err.value)


def test_nifti_all_nan(tmp_path):
    path = save_nifti(tmp_path / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(MedsynthError, match="contains 64 NaN/Inf voxels; expected finite intensities") as err:
        read_nifti(path)
    assert str(path) in str(err.value)


def test_nifti_a_few_non_finite(tmp_path):
    array = np.zeros((4, 4, 4), np.float32)
    array[0, 0, 0], array[1, 2, 3], array[3, 3, 3] = np.nan, np.inf, -np.inf
    path = save_nifti(tmp_path / "some_nan.nii", array)
    with pytest.raises(MedsynthError, match="contains 3 NaN/Inf voxels") as err:
        read_nifti(path)
    assert str(path) in str(err.value)


def test_nifti_4d_is_rejected(tmp_path):
    path = save_nifti(tmp_path / "rgb.nii.gz", np.zeros((8, 8, 8, 3), np.float32))
    with pytest.raises(MedsynthError, match=r"expected a 2D or 3D image, got shape \(8, 8, 8, 3\)") as err:
        read_nifti(path)
    assert str(path) in str(err.value)


def test_nifti_1d_is_rejected(tmp_path):
    path = save_nifti(tmp_path / "line.nii", np.zeros((8,), np.float32))
    with pytest.raises(MedsynthError, match=r"expected a 2D or 3D image, got shape \(8,\)"):
        read_nifti(path)


# --- DICOM: values and geometry ------------------------------------------------------------------


@pytest.mark.parametrize(("slope", "step"), [(1.0, 1.0), (0.5, 0.5)], ids=["slope1", "slope0.5"])
def test_dicom_series_round_trip(tmp_path, slope, step):
    hu = hu_volume(step=step)
    spacing, origin = (0.7, 0.9, 2.5), (-100.0, -120.0, 50.0)
    write_ct_series(tmp_path, hu, spacing=spacing, origin=origin, slope=slope, intercept=-1024.0)

    volumes = read_dicom_series(tmp_path)

    assert len(volumes) == 1
    volume = volumes[0]
    assert volume.modality == "ct"
    assert volume.source == str(tmp_path)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, hu)
    # Axial, LPS (-100, -120, 50) -> RAS (100, 120, 50); i runs right->left, j anterior->posterior.
    expected = np.array(
        [
            [-0.7, 0.0, 0.0, 100.0],
            [0.0, -0.9, 0.0, 120.0],
            [0.0, 0.0, 2.5, 50.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
    assert volume.affine.dtype == np.float64


def test_dicom_slices_ordered_by_position_not_instance_number(tmp_path):
    hu = hu_volume(seed=4)
    write_ct_series(tmp_path, hu, reverse_instance_numbers=True, seed=7)
    volume = read_dicom_series(tmp_path)[0]
    np.testing.assert_array_equal(volume.array, hu)
    expected = expected_ras_affine((0.8, 0.8, 2.5), (-100, -120, 50), AXIAL)
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)


@pytest.mark.parametrize("orientation", [AXIAL, (0, 1, 0, 0, 0, -1), None], ids=["axial", "sagittal", "oblique"])
def test_dicom_every_voxel_sits_where_its_file_says(tmp_path, orientation):
    """Independent of the affine formula: map voxel (i, j, k) back to LPS and to its file's pixel."""
    orientation = oblique_orientation() if orientation is None else orientation
    hu = hu_volume(shape=(7, 5, 4), seed=5)
    spacing, origin = (0.6, 1.3, 3.0), (10.0, -20.0, 30.0)
    files = write_ct_series(tmp_path, hu, spacing=spacing, origin=origin, orientation=orientation)

    volume = read_dicom_series(tmp_path)[0]

    np.testing.assert_allclose(volume.affine, expected_ras_affine(spacing, origin, orientation), atol=1e-9)
    lps_affine = LPS_TO_RAS @ volume.affine
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        row_cos = np.asarray(ds.ImageOrientationPatient[:3], float)
        col_cos = np.asarray(ds.ImageOrientationPatient[3:], float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        pixels = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for r, c in [(0, 0), (ds.Rows - 1, 0), (0, ds.Columns - 1), (2, 3)]:
            ipp = np.asarray(ds.ImagePositionPatient, float)
            world = ipp + c * col_spacing * row_cos + r * row_spacing * col_cos
            np.testing.assert_allclose(lps_affine @ [c, r, k, 1], [*world, 1], atol=1e-6)
            assert volume.array[c, r, k] == pixels[r, c]


def test_dicom_oblique_round_trip(tmp_path):
    hu = hu_volume(seed=6)
    orientation = oblique_orientation()
    write_ct_series(tmp_path, hu, orientation=orientation, spacing=(0.5, 0.75, 1.25))
    volume = read_dicom_series(tmp_path)[0]
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_allclose(
        volume.affine, expected_ras_affine((0.5, 0.75, 1.25), (-100, -120, 50), orientation), atol=1e-9
    )


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_dicom_matches_monai_pydicom_reader(tmp_path, oblique):
    """MONAI's PydicomReader (swap_ij=True, affine_lps_to_ras=True) gives the same array and affine.

    MONAI orders slices by InstanceNumber, which the factory writes in spatial order here.
    """
    from monai.transforms import LoadImage

    orientation = oblique_orientation() if oblique else AXIAL
    hu = hu_volume(shape=(9, 6, 5), seed=8)
    write_ct_series(tmp_path, hu, spacing=(0.7, 0.9, 2.5), orientation=orientation)

    ours = read_dicom_series(tmp_path)[0]
    image, meta = LoadImage(reader="PydicomReader", image_only=False)(str(tmp_path))

    assert tuple(image.shape) == ours.array.shape
    np.testing.assert_array_equal(np.asarray(image), ours.array)
    np.testing.assert_allclose(np.asarray(meta["affine"], float), ours.affine, atol=1e-5)


def test_dicom_single_slice(tmp_path):
    hu = hu_volume(shape=(6, 4, 1))
    write_ct_series(tmp_path, hu, spacing=(0.8, 0.8, 3.0))
    volume = read_dicom_series(tmp_path)[0]
    assert volume.array.shape == (6, 4, 1)
    np.testing.assert_array_equal(volume.array, hu)
    # One slice: the third axis is the normal times SliceThickness.
    expected = expected_ras_affine((0.8, 0.8, 3.0), (-100, -120, 50), AXIAL)
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)


def test_dicom_without_positions_falls_back_to_instance_number(tmp_path):
    hu = hu_volume(shape=(5, 4, 3), seed=9)
    for path in write_ct_series(tmp_path, hu):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    volume = read_dicom_series(tmp_path)[0]
    np.testing.assert_array_equal(volume.array, hu)
    np.testing.assert_allclose(np.diag(volume.affine), [-0.8, -0.8, 2.5, 1.0])


def test_dicom_volume_carries_no_patient_identifiers(tmp_path):
    write_ct_series(tmp_path, hu_volume(shape=(4, 4, 2)))
    volume = read_dicom_series(tmp_path)[0]
    assert set(vars(volume)) == {"array", "affine", "source", "modality", "files"}
    assert len(volume.files) == 2 and not any(FAKE_PATIENT_ID in f for f in volume.files)
    assert FAKE_PATIENT_NAME not in repr(volume) and FAKE_PATIENT_ID not in repr(volume)


# --- DICOM: folders ------------------------------------------------------------------------------


def test_dicom_two_series_in_one_folder(tmp_path):
    first, second = hu_volume(seed=10), hu_volume(shape=(8, 8, 3), seed=11)
    write_ct_series(tmp_path, first, seed=1)
    write_ct_series(tmp_path, second, origin=(0.0, 0.0, 0.0), seed=2)

    volumes = read_dicom_series(tmp_path)

    assert len(volumes) == 2
    shapes = {v.array.shape: v for v in volumes}
    np.testing.assert_array_equal(shapes[first.shape].array, first)
    np.testing.assert_array_equal(shapes[second.shape].array, second)


def test_dicom_skips_non_dicom_and_non_image_files(tmp_path):
    hu = hu_volume(seed=12)
    write_ct_series(tmp_path, hu)
    (tmp_path / "README.txt").write_text("exported by a scanner\n")
    (tmp_path / "DICOMDIR").write_bytes(b"\x00" * 64)
    write_rt_struct(tmp_path)

    volumes = read_dicom_series(tmp_path)

    assert len(volumes) == 1
    np.testing.assert_array_equal(volumes[0].array, hu)


def test_dicom_series_in_sub_folders_is_found_recursively(tmp_path):
    write_ct_series(tmp_path / "patient" / "study" / "series", hu_volume(shape=(4, 4, 3)))
    volumes = read_dicom_series(tmp_path)
    assert len(volumes) == 1
    assert volumes[0].source == str(tmp_path / "patient" / "study" / "series")


def test_dicom_folder_without_images(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here\n")
    write_rt_struct(tmp_path)
    with pytest.raises(MedsynthError, match="holds no DICOM image series") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(err.value)


# --- DICOM: errors -------------------------------------------------------------------------------


def test_dicom_unsupported_compression_names_the_file(tmp_path):
    path = write_unsupported_compressed_slice(tmp_path)
    with pytest.raises(MedsynthError, match="cannot decode the pixel data") as err:
        read_dicom_series(tmp_path)
    assert str(path) in str(err.value)
    assert "JPEG 2000" in str(err.value)


def test_dicom_image_without_pixel_data(tmp_path):
    files = write_ct_series(tmp_path, hu_volume(shape=(4, 4, 3)))
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    with pytest.raises(MedsynthError, match="cannot decode the pixel data") as err:
        read_dicom_series(tmp_path)
    assert str(files[1]) in str(err.value)


def test_dicom_truncated_pixel_data(tmp_path):
    files = write_ct_series(tmp_path, hu_volume(shape=(4, 4, 3)))
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-10])
    with pytest.raises(MedsynthError, match="cannot decode the pixel data") as err:
        read_dicom_series(tmp_path)
    assert str(files[2]) in str(err.value)


def test_dicom_duplicate_positions(tmp_path):
    files = write_ct_series(tmp_path, hu_volume(shape=(4, 4, 3)))
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    with pytest.raises(MedsynthError, match="same slice position"):
        read_dicom_series(tmp_path)


def test_dicom_inconsistent_size_within_series(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path, hu_volume(shape=(4, 4, 2)), series_uid=uid)
    write_ct_series(tmp_path / "more", hu_volume(shape=(5, 4, 1)), series_uid=uid, origin=(0.0, 0.0, 200.0))
    with pytest.raises(MedsynthError, match=r"\(Rows, Columns\).*expected one value per series"):
        read_dicom_series(tmp_path)


def test_dicom_inconsistent_orientation_within_series(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_ct_series(tmp_path, hu_volume(shape=(4, 4, 2)), series_uid=uid)
    write_ct_series(tmp_path / "more", hu_volume(shape=(4, 4, 1)), series_uid=uid, orientation=oblique_orientation())
    with pytest.raises(MedsynthError, match="ImageOrientationPatient .* differs"):
        read_dicom_series(tmp_path)


def test_dicom_uneven_spacing(tmp_path):
    files = write_ct_series(tmp_path, hu_volume(shape=(4, 4, 4)))
    files[2].unlink()  # a missing slice
    with pytest.raises(MedsynthError, match="slice spacing varies"):
        read_dicom_series(tmp_path)


def test_dicom_missing_folder(tmp_path):
    with pytest.raises(MedsynthError, match="folder not found"):
        read_dicom_series(tmp_path / "absent")


# --- finding images ------------------------------------------------------------------------------


def test_find_images_mixes_nifti_and_dicom(tmp_path):
    save_nifti(tmp_path / "b.nii", np.ones((4, 4, 4), np.float32))
    save_nifti(tmp_path / "a.nii.gz", np.ones((4, 4), np.float32))
    hu = hu_volume(shape=(4, 4, 3))
    write_ct_series(tmp_path / "dicom" / "ct", hu)
    (tmp_path / "dicom" / "notes.txt").write_text("not an image\n")
    write_rt_struct(tmp_path / "dicom" / "rt")
    (tmp_path / ".hidden").mkdir()
    save_nifti(tmp_path / ".hidden" / "c.nii.gz", np.ones((4, 4), np.float32))

    found = find_images(tmp_path)

    assert found == [
        ("nifti", tmp_path / "a.nii.gz"),
        ("nifti", tmp_path / "b.nii"),
        ("dicom", tmp_path / "dicom" / "ct"),
    ]
    volumes = [v for kind, path in found for v in read_any(kind, path)]
    assert [v.array.shape for v in volumes] == [(4, 4), (4, 4, 4), (4, 4, 3)]
    assert all(isinstance(v, Volume) for v in volumes)
    assert volumes[2].modality == "ct"


def test_find_images_empty_folder(tmp_path):
    with pytest.raises(MedsynthError, match="holds no NIfTI files or DICOM series") as err:
        find_images(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_find_images_missing_folder(tmp_path):
    with pytest.raises(MedsynthError, match="folder not found") as err:
        find_images(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)


def test_find_images_on_a_file(tmp_path):
    path = save_nifti(tmp_path / "a.nii", np.ones((4, 4), np.float32))
    with pytest.raises(MedsynthError, match="expected a folder"):
        find_images(path)


def test_read_any_rejects_unknown_kind(tmp_path):
    with pytest.raises(MedsynthError, match="unknown image kind 'png'"):
        read_any("png", tmp_path / "x.png")
