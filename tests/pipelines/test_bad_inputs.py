"""Bad inputs through the real CLI: one line on stderr, exit code 2, and no partial stage outputs.
Also the positive cases: a folder of the user's NIfTI files, and a folder holding a DICOM series."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_ct_series

from medsynth.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out_dir: Path, *expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    leftovers = [p.name for p in out_dir.iterdir()] if out_dir.exists() else []
    assert leftovers == [], f"partial outputs left behind: {leftovers}"


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    return path


def head_volume(seed: int, shape=(24, 24, 12)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    return (
        (np.where(radius < 0.8, 600.0, 0.0) + np.where(radius < 0.5, 300.0, 0.0) + rng.normal(0, 5, shape))
        .clip(0)
        .astype(np.float32)
    )


def folder_config(write_config, folder: Path, **data) -> Path:
    return write_config(
        {"data": {"source": "folder", "folder": str(folder), "modality": data.pop("modality", "mr"), **data}}
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train: [1, 2\n", "malformed YAML"),
        ("train:\n  epochs: 3\n", "unknown key 'train.epochs'"),
        ("train:\n  batch_size: eight\n", "train.batch_size"),
    ],
)
def test_bad_config_files(tmp_path: Path, capsys, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n" + text)
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path / "out", str(path), expected)


def test_unknown_override_key(write_config, tmp_path: Path, capsys) -> None:
    code, err = run_cli(["run", str(write_config()), "train.epochs=3"], capsys)
    assert_clean_failure(code, err, tmp_path / "out", "unknown key 'train.epochs'")


def test_unknown_stage_name(write_config, tmp_path: Path, capsys) -> None:
    code, err = run_cli(["run", str(write_config()), "--stages", "prepare,fit"], capsys)
    assert_clean_failure(code, err, tmp_path / "out", "fit")


def test_missing_data_dir(write_config, tmp_path: Path, capsys) -> None:
    code, err = run_cli(["prepare", str(folder_config(write_config, tmp_path / "nowhere"))], capsys)
    assert_clean_failure(code, err, tmp_path / "out", "data.folder", "nowhere")


def test_folder_with_no_images(write_config, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    code, err = run_cli(["prepare", str(folder_config(write_config, tmp_path / "empty"))], capsys)
    assert_clean_failure(code, err, tmp_path / "out", "empty", "no NIfTI")


def _good_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    for i in range(3):
        save(folder / f"sub-{i:02d}_T1w.nii.gz", head_volume(i))
    return folder


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "nan", "four_d"])
def test_bad_nifti_in_folder(write_config, tmp_path: Path, capsys, damage: str) -> None:
    folder = _good_folder(tmp_path)
    bad = folder / "sub-99_T1w.nii.gz"
    if damage == "corrupt":
        bad.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    elif damage == "truncated":
        save(bad, head_volume(9))
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif damage == "nan":
        save(bad, np.full((24, 24, 12), np.nan, dtype=np.float32))
    else:
        save(bad, np.zeros((24, 24, 12, 3), dtype=np.float32))
    code, err = run_cli(["prepare", str(folder_config(write_config, folder))], capsys)
    expected = {"corrupt": "corrupt", "truncated": "truncated", "nan": "NaN", "four_d": "shape"}[damage]
    assert_clean_failure(code, err, tmp_path / "out", "sub-99_T1w.nii.gz", expected)


def test_folder_of_nifti_files_becomes_a_datalist(write_config, tmp_path: Path, capsys) -> None:
    folder = _good_folder(tmp_path)
    code, err = run_cli(["prepare", str(folder_config(write_config, folder))], capsys)
    assert code == 0, err
    out = tmp_path / "out" / "prepare"
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == 3
    images = np.load(out / "cache" / "train_images.npy")
    assert images.shape[1:] == (1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert len(images) > 2  # several slices per volume for a 2D model


def test_folder_with_dicom_series(write_config, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "dicom"
    for i in range(2):
        hu = head_volume(i, (20, 20, 8)) - 1000.0
        write_ct_series(folder / f"series_{i}", hu)
    config = folder_config(write_config, folder, modality=None, spatial_dims=3, image_size=[16, 16, 8])
    code, err = run_cli(["prepare", str(config)], capsys)
    assert code == 0, err
    out = tmp_path / "out" / "prepare"
    datalist = json.loads((out / "datalist.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert {e["modality"] for e in entries} == {"ct"}
    converted = nib.load(out / entries[0]["image"])
    assert converted.shape == (20, 20, 8) and np.allclose(converted.header.get_zooms(), (0.8, 0.8, 2.5))
    text = (out / "datalist.json").read_text()
    assert "Test^Patient" not in text  # no patient identifiers copied
