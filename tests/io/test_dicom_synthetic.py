"""Tests for medsynth.io.dicom_synthetic: synthetic CT/MR series, validity, round trips, identity, errors."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_factory import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_ct_series  # noqa: E402
from test_dicom_write import check_series_iod, leftovers, patch_files  # noqa: E402

from medsynth.errors import MedsynthError  # noqa: E402
from medsynth.io.dicom_synthetic import write_synthetic_series  # noqa: E402
from medsynth.io.volumes import read_dicom_series  # noqa: E402

MODEL_URI = "models:/medsynth-ct@champion"
PROVENANCE = {
    "synthetic": True,
    "generator": "medsynth",
    "model_uri": MODEL_URI,
    "model_file": "/home/jdoe/Hospital-X/model.pt",
    "model_sha256": "3f" * 32,
    "model_step": 600,
    "train_run_id": "0a1b2c3d4e5f",
    "augment_run_id": "9f8e7d6c5b4a",
    "sampler": "ddim",
    "steps": 50,
    "guidance_scale": None,
    "config_digest": "c0" * 32,
    "code_version": {"version": "0.1.0", "git_commit": "95d1a31-dirty"},
    "modality": "ct",
    "seed": 1234,
    "index": 3,
}
CREATED = datetime.datetime(2025, 3, 4, 5, 6, 7)
HAS_DCIODVFY = shutil.which("dciodvfy") is not None
# What dciodvfy still reports, by design (see the module docstring): an MR Image with rescale tags (the
# IOD lacks the Modality LUT module; real-valued MR needs them to keep its values), and an empty
# Laterality when no body part is given.
MR_RESCALE_WARNINGS = {
    "Warning - Non-identity Modality LUT Module (RescaleSlope and RescaleIntercept) "
    "not expected to be present in standard MR IOD",
    "Warning - Attribute is not present in standard DICOM IOD - (0x0028,0x1052) DS Rescale Intercept",
    "Warning - Attribute is not present in standard DICOM IOD - (0x0028,0x1053) DS Rescale Slope",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - "
    "this is a Standard Extended SOP Class",
}
LATERALITY_WARNING = "Warning - is only permitted to be empty when actually unknown"


# --- helpers -------------------------------------------------------------------------------------


def rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def oblique_affine(spacing=(0.7, 0.9, 2.5), origin=(-40.0, 12.5, 30.25), *, flip_k: bool = False) -> np.ndarray:
    """A rotated, anisotropic RAS affine; right-handed unless ``flip_k``."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(20, 35) @ np.diag(spacing)
    affine[:3, 3] = origin
    if flip_k:
        affine[:3, 2] *= -1
    return affine


def ct_volume(shape=(12, 10, 6), seed: int = 0) -> np.ndarray:
    """A synthetic-looking CT: float HU from air to bone."""
    return np.random.default_rng(seed).uniform(-1024.0, 1500.0, size=shape).astype(np.float32)


def mr_volume(shape=(12, 10, 6), seed: int = 0) -> np.ndarray:
    """MR in arbitrary float units (a model's output scaled back), small and signed."""
    return np.random.default_rng(seed).normal(0.4, 0.2, size=shape)


def write(volume, out: Path, *, modality: str = "ct", affine=None, **kwargs) -> list[Path]:
    kwargs = {"provenance": PROVENANCE, "patient_key": "model-3f:seed-1234", "created": CREATED} | kwargs
    affine = oblique_affine() if affine is None else affine
    return write_synthetic_series(volume, affine, out, modality=modality, **kwargs)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dicom3tools' IOD validator."""
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = [line.strip() for line in (report.stdout + report.stderr).splitlines()]
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def rescale_slope(path: Path) -> float:
    return float(pydicom.dcmread(path).get("RescaleSlope", 1.0))


# --- validity ------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_DCIODVFY, reason="dciodvfy (dicom3tools, apt install dicom3tools) not installed")
@pytest.mark.parametrize("modality", ["ct", "mr"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("body_part", ["HEAD", None])
def test_dciodvfy_finds_no_errors(tmp_path, modality, dims, body_part):
    volume = ct_volume() if modality == "ct" else mr_volume()
    volume = volume[:, :, 2] if dims == 2 else volume
    files = write(volume, tmp_path / "out", modality=modality, body_part=body_part)
    assert len(files) == (1 if dims == 2 else 6)
    expected = (MR_RESCALE_WARNINGS if modality == "mr" else set()) | (
        {LATERALITY_WARNING} if body_part is None else set()
    )
    for path in files:
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        unexpected = [w for w in warnings if not any(w.startswith(e) for e in expected)]
        assert unexpected == [], f"{path.name}: {unexpected}"
        assert {e for e in expected if any(w.startswith(e) for w in warnings)} == expected  # the list is exact


@pytest.mark.skipif(not HAS_DCIODVFY, reason="dciodvfy (dicom3tools, apt install dicom3tools) not installed")
def test_dciodvfy_finds_nothing_for_ct_and_whole_number_mr(tmp_path):
    ct = write(ct_volume(), tmp_path / "ct", body_part="ABDOMEN")
    mr = write(np.rint(mr_volume() * 1000), tmp_path / "mr", modality="mr", body_part="BRAIN")
    for path in (ct[0], ct[-1], mr[0], mr[-1]):
        assert dciodvfy(path) == ([], []), path


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_iod_attributes_and_file_format(tmp_path, modality):
    files = write(ct_volume() if modality == "ct" else mr_volume(), tmp_path / "out", modality=modality)
    assert check_series_iod(files) == []
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds["PixelData"].VR == "OW"
        assert ds.SOPClassUID == (CTImageStorage if modality == "ct" else MRImageStorage)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (16, 16, 15, 1)
        assert (ds.Rows, ds.Columns) == (10, 12)
        assert ds.preamble == b"\0" * 128
    assert [p.name for p in files] == [f"slice_{k:05d}.dcm" for k in range(1, 7)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in files]


# --- values and geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_round_trip_3d_oblique(tmp_path, modality):
    volume = ct_volume() if modality == "ct" else mr_volume()
    affine = oblique_affine()
    files = write(volume, tmp_path / "out", modality=modality, affine=affine)

    (back,) = read_dicom_series(tmp_path / "out")

    slope = rescale_slope(files[0])
    assert back.array.shape == volume.shape and back.modality == modality
    assert np.abs(back.array - volume).max() <= slope / 2 * (1 + 1e-3) + 1e-6
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    assert back.files == [str(f) for f in files]


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_round_trip_2d(tmp_path, modality):
    image = (ct_volume() if modality == "ct" else mr_volume())[:, :, 0]
    affine = oblique_affine(spacing=(0.5, 0.8, 3.0))
    files = write(image, tmp_path / "out", modality=modality, affine=affine)

    (back,) = read_dicom_series(tmp_path / "out")

    assert len(files) == 1 and back.array.shape == (*image.shape, 1)
    assert np.abs(back.array[:, :, 0] - image).max() <= rescale_slope(files[0]) / 2 * (1 + 1e-3) + 1e-6
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    ds = pydicom.dcmread(files[0])
    assert float(ds.SliceThickness) == pytest.approx(3.0) and "SpacingBetweenSlices" not in ds


def test_flipped_affine_reads_back_as_the_same_image_in_world_space(tmp_path):
    """A left-handed affine: slices have no order but their position, so the reader reverses k."""
    volume, affine = ct_volume(seed=1), oblique_affine(flip_k=True)
    write(volume, tmp_path / "out", affine=affine)

    (back,) = read_dicom_series(tmp_path / "out")

    reverse_k = np.eye(4)
    reverse_k[2, 2], reverse_k[2, 3] = -1.0, volume.shape[2] - 1
    assert np.abs(back.array - volume[:, :, ::-1]).max() <= 0.5
    np.testing.assert_allclose(back.affine, affine @ reverse_k, atol=1e-4)


def test_axis_aligned_ras_geometry_tags(tmp_path):
    affine = np.diag([0.8, 0.6, 2.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    files = write(ct_volume(), tmp_path / "out", affine=affine)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        # RAS +x/+y are LPS -x/-y; PixelSpacing is (between rows = along j, between columns = along i).
        assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [0.6, 0.8]
        assert [float(v) for v in ds.ImagePositionPatient] == [-10.0, 20.0, 30.0 + 2.0 * k]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.0
        assert ds.InstanceNumber == k + 1


def test_ct_rescale_and_windows(tmp_path):
    volume = ct_volume()
    files = write(volume, tmp_path / "out")
    ds = pydicom.dcmread(files[0])
    assert (float(ds.RescaleSlope), ds.RescaleType, ds.PixelRepresentation) == (1.0, "HU", 1)  # 1 HU, like scanners
    assert [float(v) for v in ds.WindowCenter][0] == 40 and [float(v) for v in ds.WindowWidth][0] == 400
    assert list(ds.WindowCenterWidthExplanation) == ["SOFT TISSUE", "DATA P1-P99"]
    assert {str(pydicom.dcmread(f).RescaleIntercept) for f in files} == {str(ds.RescaleIntercept)}  # one per series

    wide = np.linspace(-3000.0, 90000.0, volume.size).reshape(volume.shape)
    files = write(wide, tmp_path / "wide")
    slope = rescale_slope(files[0])
    (back,) = read_dicom_series(tmp_path / "wide")
    assert slope > 1 and np.abs(back.array - wide).max() <= slope / 2 + 1e-2


def test_mr_rescale_keeps_small_float_values_and_whole_numbers_exact(tmp_path):
    tiny = mr_volume() * 1e-3
    files = write(tiny, tmp_path / "tiny", modality="mr")
    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert slope < 1e-7 and "RescaleType" not in ds
    (back,) = read_dicom_series(tmp_path / "tiny")
    assert np.abs(back.array - tiny).max() <= slope / 2 * (1 + 1e-3) + 1e-9
    assert float(ds.WindowWidth) >= 1  # the standard's lower bound for a linear window

    whole = np.rint(mr_volume() * 1000 + 500)
    files = write(whole, tmp_path / "whole", modality="mr")
    ds = pydicom.dcmread(files[0])
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    (back,) = read_dicom_series(tmp_path / "whole")
    np.testing.assert_array_equal(back.array, whole)


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_constant_volume(tmp_path, modality):
    volume = np.full((6, 5, 2), 37.25)
    write(volume, tmp_path / "out", modality=modality)
    (back,) = read_dicom_series(tmp_path / "out")
    assert np.abs(back.array - volume).max() <= 0.5


# --- synthetic marks, provenance, identity -------------------------------------------------------


def test_synthetic_marks_and_provenance(tmp_path):
    files = write(
        ct_volume(), tmp_path / "out", series_description="medsynth SYNTHETIC body CT seed 1234", series_number=7
    )
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SeriesDescription == "medsynth SYNTHETIC body CT seed 1234" and ds.SeriesNumber == 7
        assert ds.ImageComments.startswith("SYNTHETIC image")
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert (ds.BurnedInAnnotation, ds.PatientIdentityRemoved) == ("NO", "YES")
        assert ds.DeidentificationMethod == "synthetic image; no source patient"
        (equipment,) = ds.ContributingEquipmentSequence
        assert equipment.Manufacturer == ds.Manufacturer == "medsynth"
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert list(ds.SoftwareVersions) == ["version 0.1.0", "git_commit 95d1a31-dirty"]
        for text in (ds.DerivationDescription, ds.ImageComments, equipment.ContributionDescription):
            for expected in (
                f"model_uri={MODEL_URI}",
                "seed=1234",
                "model_sha256=" + "3f" * 32,
                "train_run_id=0a1b2c3d4e5f",
                "augment_run_id=9f8e7d6c5b4a",
                "config_digest=" + "c0" * 32,
                "git_commit=95d1a31-dirty",
            ):
                assert expected in text, (expected, text)
        assert (ds.StudyDate, ds.SeriesDate, ds.ContentDate, ds.StudyTime) == (
            "20250304",
            "20250304",
            "20250304",
            "050607",
        )
    raw = b"".join(p.read_bytes() for p in files)
    assert b"jdoe" not in raw and b"Hospital-X" not in raw  # provenance paths are not written


def test_mr_marks(tmp_path):
    ds = pydicom.dcmread(write(mr_volume(), tmp_path / "out", modality="mr")[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert (ds.Modality, ds.ScanningSequence, ds.SequenceVariant) == ("MR", "RM", "NONE")
    assert ds["EchoTime"].is_empty and ds["RepetitionTime"].is_empty


def test_no_identifier_of_a_training_scan_reaches_the_files(tmp_path):
    """Even a volume copied voxel for voxel from a training scan carries none of its identity."""
    train_files = write_ct_series(tmp_path / "train", ct_volume(seed=5).round(), spacing=(0.8, 0.8, 2.5))
    identity = {
        "PatientBirthDate": "19610417",
        "PatientSex": "F",
        "InstitutionName": "St Elsewhere Hospital",
        "ReferringPhysicianName": "House^Gregory",
        "AccessionNumber": "ACC778899",
        "StudyID": "ST4242",
        "OperatorsName": "Op^Erator",
        "StationName": "CT-ROOM-7",
        "OtherPatientIDs": "MRN-00991",
    }
    patch_files(train_files, **identity)
    (train,) = read_dicom_series(tmp_path / "train")
    headers = [pydicom.dcmread(p) for p in train_files]
    secrets = {
        FAKE_PATIENT_NAME,
        FAKE_PATIENT_ID,
        *identity.values(),
        headers[0].StudyDate,
        headers[0].StudyInstanceUID,
        headers[0].SeriesInstanceUID,
        headers[0].FrameOfReferenceUID,
        *(h.SOPInstanceUID for h in headers),
    }
    secrets.discard("F")

    files = write(train.array, tmp_path / "out", affine=train.affine, patient_key=None)

    raw = b"".join(p.read_bytes() for p in files)
    for secret in secrets:
        assert secret.encode() not in raw, secret
    for path in files:
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName).startswith("SYNTHETIC^") and len(str(ds.PatientName)) == len("SYNTHETIC^") + 10
        assert ds.PatientID.startswith("MEDSYNTH-") and len(ds.PatientID) == len("MEDSYNTH-") + 10
        assert ds.PatientBirthDate == "" and ds.PatientSex == "O" and ds.ReferringPhysicianName == ""
        for keyword in (
            "InstitutionName",
            "InstitutionAddress",
            "OperatorsName",
            "PerformingPhysicianName",
            "StationName",
            "OtherPatientIDs",
            "DeviceSerialNumber",
        ):
            assert keyword not in ds, keyword
        assert not any(element.tag.is_private for element in ds)


def test_uids(tmp_path):
    one = [pydicom.dcmread(p) for p in write(ct_volume(seed=1), tmp_path / "one")]
    two = [pydicom.dcmread(p) for p in write(ct_volume(seed=2), tmp_path / "two")]  # same provenance and patient
    other_seed = [
        pydicom.dcmread(p) for p in write(ct_volume(seed=1), tmp_path / "three", provenance=PROVENANCE | {"seed": 99})
    ]

    def uids(series):
        keys = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
        return {str(ds.get(k)) for ds in series for k in keys} | {str(ds.SOPInstanceUID) for ds in series}

    for series in (one, two, other_seed):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
            assert len({str(ds.get(keyword)) for ds in series}) == 1, keyword
        assert len({ds.SOPInstanceUID for ds in series}) == len(series)
        assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in series)
        assert all(ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID for ds in series)
        assert all(len(str(ds.SOPInstanceUID)) <= 64 for ds in series)
    assert len(uids(one)) == 3 + 6
    assert not uids(one) & uids(two) and not uids(one) & uids(other_seed) and not uids(two) & uids(other_seed)
    assert one[0].PatientID == two[0].PatientID  # one patient_key, one pseudonymous patient


def test_same_inputs_give_identical_files(tmp_path):
    a = write(ct_volume(seed=3), tmp_path / "a")
    b = write(ct_volume(seed=3), tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]

    # Another write time changes the dates only: the image, hence its UIDs, is the same.
    c = write(ct_volume(seed=3), tmp_path / "c", created=CREATED + datetime.timedelta(days=1))
    old, new = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert (old.SOPInstanceUID, old.StudyInstanceUID) == (new.SOPInstanceUID, new.StudyInstanceUID)
    assert (old.StudyDate, new.StudyDate) == ("20250304", "20250305")

    # A fresh patient each time without a patient_key, and fresh UIDs with it.
    d = write(ct_volume(seed=3), tmp_path / "d", patient_key=None)
    e = write(ct_volume(seed=3), tmp_path / "e", patient_key=None)
    d, e = pydicom.dcmread(d[0]), pydicom.dcmread(e[0])
    assert len({d.PatientID, e.PatientID, old.PatientID}) == 3
    assert len({d.SOPInstanceUID, e.SOPInstanceUID, old.SOPInstanceUID}) == 3


def test_default_creation_time_is_now(tmp_path):
    before = datetime.datetime.now().replace(microsecond=0)
    ds = pydicom.dcmread(write(ct_volume(), tmp_path / "out", created=None)[0])
    stamped = datetime.datetime.strptime(ds.StudyDate + ds.StudyTime, "%Y%m%d%H%M%S")
    assert before <= stamped <= datetime.datetime.now()


def test_instance_prefix_names_the_files(tmp_path):
    files = write(ct_volume(shape=(4, 4, 3)), tmp_path / "out", instance_prefix="case-07_img")
    assert [p.name for p in files] == ["case-07_img_00001.dcm", "case-07_img_00002.dcm", "case-07_img_00003.dcm"]


# --- errors and atomicity: nothing written ---------------------------------------------------------


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert leftovers(out.parent) == []


def _nan_volume():
    volume = ct_volume()
    volume[1, 2, 3] = np.nan
    return volume


def _inf_volume():
    volume = ct_volume()
    volume[0, 0, 0] = -np.inf
    return volume


def _sheared():
    affine = oblique_affine()
    affine[:3, 1] += 0.1 * affine[:3, 0]
    return affine


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"volume": _nan_volume()}, "1 NaN/Inf voxels"),
        ({"volume": _inf_volume()}, "1 NaN/Inf voxels"),
        ({"volume": np.zeros(5)}, r"shape \(5,\).*expected a real 2D"),
        ({"volume": np.zeros((2, 3, 4, 5))}, "expected a real 2D"),
        ({"volume": np.zeros((4, 4, 3), dtype=complex)}, "expected a real 2D"),
        ({"volume": np.zeros((0, 4, 3))}, "at least one slice"),
        ({"affine": np.eye(3)}, r"shape \(3, 3\)"),
        ({"affine": np.diag([1.0, 1.0, 0.0, 1.0])}, "singular"),
        ({"affine": np.full((4, 4), np.nan)}, "finite"),
        ({"affine": _sheared()}, "not orthogonal"),
        ({"modality": "pet"}, "modality 'pet': expected one of ct, mr"),
        ({"instance_prefix": "../x"}, "instance_prefix"),
        ({"instance_prefix": ".hidden"}, "instance_prefix"),
        ({"instance_prefix": "a/b"}, "instance_prefix"),
        ({"instance_prefix": ""}, "instance_prefix"),
        ({"series_description": "medsynth body CT"}, "contain 'SYNTHETIC'"),
        ({"series_description": "SYNTHETIC σ"}, "printable ASCII"),
        ({"series_description": "SYNTHETIC " + "x" * 60}, "at most 64"),
        ({"provenance": PROVENANCE | {"seed": None}}, "provenance lacks seed"),
        ({"provenance": {"seed": 1, "model_uri": None}}, "model_uri and model_sha256"),
        ({"provenance": PROVENANCE | {"sampler": "ddim σ"}}, r"provenance\['sampler'\]"),
        ({"series_number": -1}, "series_number"),
        ({"body_part": "knee"}, "body_part"),
        ({"created": "2025-01-01"}, "created"),
        ({"volume": np.array([[[1e15 + 0.3]], [[1e15 + 1.3]]]), "modality": "mr"}, "cannot be stored as 16-bit"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_inputs(tmp_path, kwargs, match):
    kwargs = {"volume": ct_volume(), "out": tmp_path / "out"} | kwargs
    with pytest.raises(MedsynthError, match=match):
        write(kwargs.pop("volume"), kwargs.pop("out"), **kwargs)
    _assert_nothing_written(tmp_path / "out")


def test_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    with pytest.raises(MedsynthError, match="not an empty folder"):
        write(ct_volume(), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedsynthError, match="not an empty folder"):
        write(ct_volume(), tmp_path / "file")
    assert leftovers(tmp_path) == []

    (tmp_path / "empty").mkdir()
    assert len(write(ct_volume(), tmp_path / "empty")) == 6 and leftovers(tmp_path) == []


def test_failure_after_the_first_slice_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    original = pydicom.Dataset.save_as

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    mode = pydicom.config.settings._writing_validation_mode
    out = tmp_path / "nested" / "out"
    with pytest.raises(OSError, match="disk full"):
        write(ct_volume(), out)
    assert len(calls) == 2
    _assert_nothing_written(out)
    assert pydicom.config.settings._writing_validation_mode == mode  # restored after the error
