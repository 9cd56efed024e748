"""Tests for medsynth.io.dicom_write: derived DICOM series round trips, tags, rescale, and errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_factory import FAKE_PATIENT_ID, write_ct_series  # noqa: E402

from medsynth.errors import MedsynthError  # noqa: E402
from medsynth.io.dicom_write import write_derived_series  # noqa: E402
from medsynth.io.volumes import Volume, read_dicom_series  # noqa: E402

DERIVATION = "medsynth denoise: diffusion (DDIM 10 steps from t=87), sigma 12.3 HU"


# --- an IOD check of the Type 1 and Type 2 attributes (PS3.3 A.3 CT Image, A.4 MR Image) ---------
#
# Only what can be decided from the header is checked: conditional attributes whose condition is
# clinical (Laterality, Contrast/Bolus, ContentDate/Time "if temporally related", SpecificCharacterSet
# "if extended characters are used") are not. Optional (U) modules are not checked.

_MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # module: (type 1, type 2)
    "Patient": ((), ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")),
    "General Study": (
        ("StudyInstanceUID",),
        ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"),
    ),
    "General Series": (("Modality", "SeriesInstanceUID"), ("SeriesNumber",)),
    "Frame of Reference": (("FrameOfReferenceUID",), ("PositionReferenceIndicator",)),
    "General Equipment": ((), ("Manufacturer",)),
    "General Image": ((), ("InstanceNumber",)),
    "Image Plane": (("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"), ("SliceThickness",)),
    "Image Pixel": (
        (
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "Rows",
            "Columns",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "PixelData",
        ),
        (),
    ),
    "SOP Common": (("SOPClassUID", "SOPInstanceUID"), ()),
}
_IMAGE_PIXEL_1 = ("ImageType", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit")
_IODS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {  # SOP class: modality, module, 1, 2
    CTImageStorage: (
        "CT",
        "CT Image",
        _IMAGE_PIXEL_1 + ("RescaleIntercept", "RescaleSlope"),
        ("KVP", "AcquisitionNumber"),
    ),
    MRImageStorage: (
        "MR",
        "MR Image",
        _IMAGE_PIXEL_1 + ("ScanningSequence", "SequenceVariant"),
        ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"),
    ),
}


def _values(ds: pydicom.Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, pydicom.multival.MultiValue)) else [str(value)]


def check_series_iod(files: Iterable[str | Path]) -> list[str]:
    """Problems with the Type 1/2 attributes of CT Image or MR Image objects, and series consistency.

    Returns:
        ``"<file name>: <module>: <keyword> ..."`` lines; empty when the series passes.
    """
    problems: list[str] = []
    series_uids, sop_uids = set(), []
    for path in map(Path, files):
        ds = pydicom.dcmread(path)
        where = path.name
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in _IODS:
            problems.append(f"{where}: SOP class {sop_class!r} is neither CT Image nor MR Image Storage")
            continue
        modality, module, iod_1, iod_2 = _IODS[sop_class]
        modules = dict(_MODULES)
        modules[module] = (iod_1, iod_2)
        # General Series: Patient Position is 2C, required for CT/MR Image unless an orientation code is given.
        if "PatientOrientationCodeSequence" not in ds:
            modules["General Series"] = (
                modules["General Series"][0],
                modules["General Series"][1] + ("PatientPosition",),
            )
        if sop_class == MRImageStorage:
            scanning, variant = _values(ds, "ScanningSequence"), _values(ds, "SequenceVariant")
            extra = () if ("EP" in scanning and "SK" not in variant) else ("RepetitionTime",)
            extra += ("InversionTime",) if "IR" in scanning else ()
            modules[module] = (iod_1, iod_2 + extra)
        for name, (type_1, type_2) in modules.items():
            for keyword in type_1:
                if keyword not in ds:
                    problems.append(f"{where}: {name}: type 1 {keyword} missing")
                elif ds[keyword].is_empty:
                    problems.append(f"{where}: {name}: type 1 {keyword} empty")
            problems.extend(f"{where}: {name}: type 2 {k} missing" for k in type_2 if k not in ds)

        # Enumerated values that the CT/MR Image modules fix.
        if ds.get("Modality") != modality:
            problems.append(f"{where}: Modality {ds.get('Modality')!r}; expected {modality}")
        image_type = _values(ds, "ImageType")
        if (
            len(image_type) < 2
            or image_type[0] not in ("ORIGINAL", "DERIVED")
            or image_type[1] not in ("PRIMARY", "SECONDARY")
        ):
            problems.append(f"{where}: ImageType {image_type}; expected ORIGINAL|DERIVED \\ PRIMARY|SECONDARY")
        if ds.get("SamplesPerPixel") != 1 or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
            problems.append(f"{where}: expected one sample per pixel, MONOCHROME1 or MONOCHROME2")
        bits_stored = int(ds.get("BitsStored") or 0)
        if ds.get("BitsAllocated") != 16 or not 12 <= bits_stored <= 16 or ds.get("HighBit") != bits_stored - 1:
            problems.append(f"{where}: expected BitsAllocated 16, BitsStored 12..16, HighBit = BitsStored - 1")
        if "PixelData" in ds and len(ds.PixelData) != int(ds.Rows) * int(ds.Columns) * 2:
            problems.append(f"{where}: PixelData holds {len(ds.PixelData)} bytes; expected Rows x Columns x 2")
        meta = ds.file_meta
        if meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID") or meta.get(
            "MediaStorageSOPInstanceUID"
        ) != ds.get("SOPInstanceUID"):
            problems.append(f"{where}: file meta SOP class/instance differ from the dataset's")
        series_uids.add(str(ds.get("SeriesInstanceUID")))
        sop_uids.append(str(ds.get("SOPInstanceUID")))
    if len(series_uids) > 1:
        problems.append(f"series: {len(series_uids)} SeriesInstanceUIDs; expected one")
    if len(set(sop_uids)) != len(sop_uids):
        problems.append("series: SOPInstanceUIDs are not unique")
    return problems


# --- helpers -------------------------------------------------------------------------------------


def hu_volume(shape=(12, 10, 5), *, step: float = 1.0, seed: int = 0) -> np.ndarray:
    """Random HU on a grid of ``step``, from -1024 (air) up, so they are exact after rescaling."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 3000, size=shape) * step - 1024.0).astype(np.float32)


def patch_files(files: Iterable[Path], *, remove: Iterable[str] = (), **values) -> None:
    """Rewrite source files with some attributes set or removed (the factory writes a minimal CT)."""
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in remove:
            if keyword in ds:
                del ds[keyword]
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        if "SOPClassUID" in values:
            ds.file_meta.MediaStorageSOPClassUID = values["SOPClassUID"]
        ds.save_as(path, enforce_file_format=True)


TYPE_2_SOURCE = {  # the type 2 attributes the factory leaves out, as a scanner would write them
    "PatientBirthDate": "",
    "PatientSex": "O",
    "StudyTime": "120000",
    "ReferringPhysicianName": "",
    "StudyID": "1",
    "AccessionNumber": "",
    "PositionReferenceIndicator": "",
    "Manufacturer": "Synthetic",
    "PatientPosition": "HFS",
    "AcquisitionNumber": 1,
}
MR_SOURCE = {
    "SOPClassUID": MRImageStorage,
    "Modality": "MR",
    "ScanningSequence": "SE",
    "SequenceVariant": "NONE",
    "ScanOptions": "",
    "MRAcquisitionType": "2D",
    "RepetitionTime": "500",
    "EchoTime": "15",
    "EchoTrainLength": 1,
}


def ct_source(folder: Path, hu: np.ndarray, **kwargs) -> Volume:
    write_ct_series(folder, hu, **kwargs)
    patch_files(sorted(folder.iterdir()), KVP="120", **TYPE_2_SOURCE)
    (volume,) = read_dicom_series(folder)
    return volume


def mr_source(folder: Path, values: np.ndarray) -> Volume:
    """An MR Image series without rescale tags: the stored values are the values."""
    write_ct_series(folder, values, slope=1.0, intercept=0.0, modality="MR")
    patch_files(
        sorted(folder.iterdir()),
        remove=("RescaleSlope", "RescaleIntercept", "RescaleType"),
        **TYPE_2_SOURCE,
        **MR_SOURCE,
    )
    (volume,) = read_dicom_series(folder)
    return volume


def derive(volume: Volume, out: Path, array: np.ndarray | None = None, **kwargs) -> tuple[list[Path], Volume]:
    files = write_derived_series(
        out, volume.array if array is None else array, volume.files, derivation=DERIVATION, **kwargs
    )
    (derived,) = read_dicom_series(out)
    return files, derived


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- values and geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_round_trip_identical_array_is_exact(tmp_path, slope):
    source = ct_source(tmp_path / "src", hu_volume(step=slope), slope=slope, intercept=-1024.0)

    files, derived = derive(source, tmp_path / "out")

    assert [f.name for f in files] == [f"IM{k:05d}.dcm" for k in range(1, 6)]
    assert derived.files == [str(f) for f in files]
    np.testing.assert_array_equal(derived.array, source.array)
    np.testing.assert_allclose(derived.affine, source.affine, atol=1e-6)
    assert derived.modality == "ct"
    for new, old in zip(files, source.files):  # the source rescale is kept, as text
        new, old = pydicom.dcmread(new), pydicom.dcmread(old)
        assert (new.RescaleSlope, new.RescaleIntercept, new.RescaleType) == (
            old.RescaleSlope,
            old.RescaleIntercept,
            "HU",
        )


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_changed_array_within_half_slope(tmp_path, slope):
    source = ct_source(tmp_path / "src", hu_volume(step=slope), slope=slope, intercept=-1024.0)
    noisy = source.array + np.random.default_rng(1).normal(0, 20, source.array.shape).astype(np.float32)

    files, derived = derive(source, tmp_path / "out", noisy)

    assert noisy.min() < -1024  # below the intercept: stored values go negative, so int16
    ds = pydicom.dcmread(files[0])
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.PixelRepresentation) == (slope, -1024.0, 1)
    assert np.abs(derived.array - noisy).max() <= slope / 2 + 1e-3


def test_ct_values_beyond_16_bits_get_a_new_rescale(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume(step=0.5), slope=0.5, intercept=-1024.0)
    wide = np.linspace(-3000.0, 70000.0, source.array.size, dtype=np.float32).reshape(source.array.shape)

    files, derived = derive(source, tmp_path / "out", wide)

    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert slope > 0.5 and ds.RescaleType == "HU"
    assert {float(pydicom.dcmread(f).RescaleSlope) for f in files} == {slope}
    assert np.abs(derived.array - wide).max() <= slope / 2 + 1e-2


def test_mr_without_rescale_writes_rounded_values(tmp_path):
    values = np.random.default_rng(2).integers(0, 4000, size=(12, 10, 5)).astype(np.float32)
    source = mr_source(tmp_path / "src", values)
    smooth = source.array + np.float32(0.3)

    files, derived = derive(source, tmp_path / "out", smooth)

    ds = pydicom.dcmread(files[0])
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
    np.testing.assert_array_equal(derived.array, np.rint(smooth))
    assert derived.modality == "mr"


def test_mr_values_beyond_16_bits_get_rescale_tags(tmp_path):
    values = np.random.default_rng(3).integers(0, 4000, size=(12, 10, 5)).astype(np.float32)
    source = mr_source(tmp_path / "src", values)
    wide = np.linspace(-50000.5, 90000.25, source.array.size).reshape(source.array.shape)

    files, derived = derive(source, tmp_path / "out", wide)

    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert slope > 1 and "RescaleType" not in ds
    assert np.abs(derived.array - wide).max() <= slope / 2 + 1e-2
    assert check_series_iod(files) == []


def test_slice_k_maps_to_its_source_file_whatever_the_file_order(tmp_path):
    hu = hu_volume(seed=4)
    source = ct_source(tmp_path / "src", hu, shuffle_files=True, reverse_instance_numbers=True, seed=7)
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in source.files] == [5, 4, 3, 2, 1]
    changed = source.array + np.arange(5, dtype=np.float32)  # slice k shifted by k HU

    files, derived = derive(source, tmp_path / "out", changed)

    np.testing.assert_array_equal(derived.array, changed)
    for k, (new, old) in enumerate(zip(files, source.files)):
        new, old = pydicom.dcmread(new), pydicom.dcmread(old)
        assert new.InstanceNumber == k + 1
        assert new.ImagePositionPatient == old.ImagePositionPatient
        assert new.SourceImageSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless], ids=["implicit", "rle"])
def test_any_source_transfer_syntax_gives_explicit_vr_little_endian(tmp_path, syntax):
    write_ct_series(tmp_path / "src", hu_volume(seed=5), transfer_syntax=ImplicitVRLittleEndian)
    if syntax == RLELossless:
        for path in (tmp_path / "src").iterdir():
            ds = pydicom.dcmread(path)
            ds.compress(RLELossless)
            ds.save_as(path, enforce_file_format=True)
    (source,) = read_dicom_series(tmp_path / "src")
    assert pydicom.dcmread(source.files[0]).file_meta.TransferSyntaxUID == syntax

    files, derived = derive(source, tmp_path / "out")

    np.testing.assert_array_equal(derived.array, source.array)
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds["PixelData"].VR == "OW" and ds.LossyImageCompression == "00"


# --- derived tags --------------------------------------------------------------------------------


def test_derived_tags(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume(seed=6))
    for path in map(Path, source.files):  # what a scanner adds that no longer holds for new pixels
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "Abdomen 1.0 B30f"
        ds.SeriesNumber = 3
        ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x01, "LO", "original pixels")
        ds.add_new(0x00280106, "SS", -1024)  # SmallestImagePixelValue
        ds.add_new(0x00280107, "SS", 1976)  # LargestImagePixelValue
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue
        ds.IconImageSequence = [pydicom.Dataset()]
        ds.save_as(path, enforce_file_format=True)

    files, _ = derive(source, tmp_path / "out")

    new_uids = []
    for new_path, old_path in zip(files, source.files):
        new, old = pydicom.dcmread(new_path), pydicom.dcmread(old_path)
        assert list(new.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert new.DerivationDescription == DERIVATION
        (ref,) = new.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (old.SOPClassUID, old.SOPInstanceUID)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert new.SeriesInstanceUID != old.SeriesInstanceUID and new.SOPInstanceUID != old.SOPInstanceUID
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        assert new.SOPClassUID == old.SOPClassUID
        for keyword in (
            "PatientID",
            "PatientName",
            "StudyInstanceUID",
            "FrameOfReferenceUID",
            "Manufacturer",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "StudyDate",
        ):
            assert new.get(keyword) == old.get(keyword), keyword
        assert new.PatientID == FAKE_PATIENT_ID
        assert (new.SeriesNumber, new.SeriesDescription) == (1003, "Abdomen 1.0 B30f (denoised)")
        assert new.SeriesDate and new.SeriesTime and new.ContentDate and new.InstanceCreationTime
        assert new.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert not any(element.tag.is_private for element in new)
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue", "IconImageSequence"):
            assert keyword not in new, keyword
        assert (new.BitsAllocated, new.BitsStored, new.HighBit, new.PhotometricInterpretation) == (
            16,
            16,
            15,
            "MONOCHROME2",
        )
        new_uids.append(new.SOPInstanceUID)
    assert len(set(new_uids)) == len(new_uids)
    assert len({pydicom.dcmread(f).SeriesInstanceUID for f in files}) == 1


def test_description_and_number_overrides_and_long_default(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume(seed=7))
    patch_files(map(Path, source.files), SeriesDescription="x" * 64)
    files, _ = derive(source, tmp_path / "a")
    description = pydicom.dcmread(files[0]).SeriesDescription
    assert len(description) == 64 and description.endswith(" (denoised)")

    files, _ = derive(source, tmp_path / "b", series_description="My denoised", series_number=77)
    ds = pydicom.dcmread(files[0])
    assert (ds.SeriesDescription, ds.SeriesNumber) == ("My denoised", 77)


def test_lossy_history_is_kept(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume(seed=8))
    patch_files(
        map(Path, source.files),
        LossyImageCompression="01",
        LossyImageCompressionRatio="8",
        LossyImageCompressionMethod="ISO_10918_1",
    )
    files, _ = derive(source, tmp_path / "out")
    ds = pydicom.dcmread(files[0])
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")


def test_iod_check_passes_on_derived_series_and_catches_a_bare_source(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume(seed=9))
    files, _ = derive(source, tmp_path / "out")
    assert check_series_iod(files) == []

    bare = write_ct_series(tmp_path / "bare", hu_volume(seed=9))
    problems = check_series_iod(bare)
    assert any("type 2 KVP missing" in p for p in problems)
    assert any("type 2 Manufacturer missing" in p for p in problems)

    # A source lacking Type 2 attributes gives a valid derived series: they are added empty (unknown).
    (volume,) = read_dicom_series(tmp_path / "bare")
    files, _ = derive(volume, tmp_path / "from_bare")
    assert check_series_iod(files) == []
    ds = pydicom.dcmread(files[0])
    assert ds["KVP"].is_empty and ds["Manufacturer"].is_empty and ds["PatientBirthDate"].is_empty


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools, apt install dicom3tools) not installed"
)
@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_dciodvfy_accepts_the_derived_series(kind, tmp_path):
    """The DICOM standard's IOD checker from dicom3tools finds no error in a derived series."""
    if kind == "ct":
        volume = ct_source(tmp_path / "src", hu_volume(seed=3))
    else:
        volume = mr_source(tmp_path / "src", np.abs(hu_volume(seed=3)) % 2000)
    patch_files(volume.files, BodyPartExamined="ABDOMEN" if kind == "ct" else "BRAIN")
    (volume,) = read_dicom_series(tmp_path / "src")
    files, _ = derive(volume, tmp_path / "out", volume.array + 1.0)
    for path in files:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


# --- errors: nothing written ---------------------------------------------------------------------


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert leftovers(out.parent) == []


def test_wrong_shape(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume())
    out = tmp_path / "out"
    with pytest.raises(MedsynthError, match=r"shape \(10, 12, 5\); expected \(Columns, Rows, slices\) = \(12, 10, 5\)"):
        write_derived_series(out, source.array.transpose(1, 0, 2), source.files, derivation=DERIVATION)
    with pytest.raises(MedsynthError, match="expected a real 3D"):
        write_derived_series(out, source.array[:, :, 0], source.files, derivation=DERIVATION)
    with pytest.raises(MedsynthError, match=r"= \(12, 10, 4\)"):
        write_derived_series(out, source.array, source.files[:4], derivation=DERIVATION)
    _assert_nothing_written(out)


def test_nan_in_array(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume())
    array = source.array.copy()
    array[3, 4, 2] = np.nan
    out = tmp_path / "out"
    with pytest.raises(MedsynthError, match="1 NaN/Inf voxels"):
        write_derived_series(out, array, source.files, derivation=DERIVATION)
    _assert_nothing_written(out)


def test_existing_non_empty_output(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    with pytest.raises(MedsynthError, match="not an empty folder"):
        write_derived_series(out, source.array, source.files, derivation=DERIVATION)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_existing_empty_output_is_used(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume())
    (tmp_path / "out").mkdir()
    files, derived = derive(source, tmp_path / "out")
    assert len(files) == 5 and leftovers(tmp_path) == []


def test_bad_text(tmp_path):
    source = ct_source(tmp_path / "src", hu_volume())
    out = tmp_path / "out"
    with pytest.raises(MedsynthError, match="series_description"):
        write_derived_series(out, source.array, source.files, derivation=DERIVATION, series_description="a\\b")
    with pytest.raises(MedsynthError, match="derivation"):
        write_derived_series(out, source.array, source.files, derivation="σ = 12 HU")
    _assert_nothing_written(out)


def test_failure_while_writing_removes_the_temporary_folder(tmp_path, monkeypatch):
    source = ct_source(tmp_path / "src", hu_volume())
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    original = pydicom.Dataset.save_as
    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    mode = pydicom.config.settings._writing_validation_mode
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        write_derived_series(out, source.array, source.files, derivation=DERIVATION)
    _assert_nothing_written(out)
    assert pydicom.config.settings._writing_validation_mode == mode  # restored after the error
