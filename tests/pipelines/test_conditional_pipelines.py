"""Class-conditional (classifier-free guidance), latent and ControlNet pipelines through the real CLI on
tiny phantoms, and their bad inputs (one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.cli import main

CFG = {"data": {"phantom": {"count": 16, "lesion_size": 3.0}}, "model": {"num_classes": 2},
       "train": {"label_dropout": 0.2}, "sample": {"sampler": "heun", "steps": 4, "guidance_scale": 2.0},
       "evaluate": {"classifier_steps": 20}}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr (stage status lines go to stdout)."""
    code = main(args)
    return code, capsys.readouterr().err


def one_line_exit_2(code: int, err: str, *expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


def test_class_conditional_pipeline_records_classes_and_checks_them(write_config, tmp_path: Path, capsys) -> None:
    config = write_config(CFG)
    out = tmp_path / "out"
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    record = json.loads((out / "sample" / "samples.json").read_text())
    assert record["classes"] == [0, 1, 0, 1] and record["guidance_scale"] == 2.0
    assert np.load(out / "sample" / "sample_classes.npy").tolist() == [0, 1, 0, 1]
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    check = metrics["class_check"]
    assert check["requested"] == [0, 1, 0, 1] and len(check["predicted"]) == 4
    for key in ("eval/class/agreement", "eval/class/real_accuracy", "eval/class/0/agreement", "eval/class/1/diversity_ms_ssim"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0, key
    # augment: a balanced synthetic set, each case with its class in the datalist and the sidecar
    datalist = json.loads((out / "augment" / "datalist_augmented.json").read_text())
    synthetic = [e for e in datalist["training"] if e.get("synthetic")]
    assert synthetic and all("class_label" in e for e in synthetic)
    sidecar = json.loads((out / "augment" / synthetic[0]["provenance"]).read_text())
    assert sidecar["class_label"] == synthetic[0]["class_label"] and sidecar["guidance_scale"] == 2.0

    # one class only, on the same model (train is unchanged and skipped)
    code, err = run_cli(["sample", str(config), "sample.class_label=1"], capsys)
    assert code == 0, err
    assert json.loads((out / "sample" / "samples.json").read_text())["classes"] == [1, 1, 1, 1]


@pytest.mark.parametrize("overrides, expected", [
    (["sample.guidance_scale=3"], "sample.guidance_scale needs a class-conditional model"),
    (["sample.class_label=1"], "sample.class_label needs a class-conditional model"),
    (["model.num_classes=2", "sample.class_label=2"], "outside the model's classes 0..1"),
    (["model.num_classes=2", "sample.class_label=[]"], "empty list"),
    (["model.num_classes=2", "sample.guidance_scale=-1"], "sample.guidance_scale"),
    (["train.label_dropout=1.0"], "train.label_dropout"),
])
def test_bad_guidance_settings_are_one_line_exit_2(write_config, tmp_path: Path, capsys, overrides, expected) -> None:
    code, err = run_cli(["run", str(write_config()), *overrides], capsys)
    one_line_exit_2(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_class_conditional_model_on_data_without_classes_is_one_line_exit_2(write_config, tmp_path: Path, capsys) -> None:
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        nib.save(nib.Nifti1Image(rng.uniform(0, 100, (16, 16, 4)).astype(np.float32), np.eye(4)), folder / f"scan{i}.nii.gz")
    config = write_config({"data": {"source": "folder", "folder": str(folder), "modality": "mr", "val_fraction": 0.25},
                           "model": {"num_classes": 2}})
    code, err = run_cli(["run", str(config), "--stages", "prepare,train"], capsys)
    one_line_exit_2(code, err, "images without a class label", "model.num_classes=2")
    assert not (tmp_path / "out" / "train").exists() and not list((tmp_path / "out").glob(".train*"))
