"""Trustworthy synthetic data through the real CLI on tiny phantoms: feature metrics with the feature
network recorded, the memorisation audit (refuse / drop), the MLflow review and best alias, the utility
stage, synthetic DICOM export without patient identifiers, and their bad inputs (one line, exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
import torch

from medsynth.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_3D, one_line_exit_2  # noqa: E402
from dicom_factory import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, write_ct_series  # noqa: E402

torch.set_num_threads(1)

CONDITIONAL = {
    "data": {"phantom": {"count": 16, "lesion_size": 3.0}},
    "model": {"num_classes": 2},
    "sample": {"sampler": "heun", "steps": 3, "guidance_scale": 2.0},
    "evaluate": {"classifier_steps": 5},
    "stages": ["prepare", "train", "sample", "evaluate", "augment", "utility"],
}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_reports_feature_metrics_audit_and_review(write_config, tmp_path: Path, capsys) -> None:
    config = write_config({"tracking": {"experiment": "trust-review", "registered_model": "trust-review"}})
    code, out_text, err = run_cli(["run", str(config), "stages=[prepare,train,sample,evaluate]"], capsys)
    assert code == 0, err
    out = tmp_path / "out" / "evaluate"
    record = json.loads((out / "metrics.json").read_text())
    metrics = record["metrics"]
    for key in (
        "eval/fid",
        "eval/precision",
        "eval/recall",
        "eval/feature_mmd",
        "eval/mmd",
        "eval/audit/flagged",
        "eval/audit/image/median_ratio",
        "eval/audit/feature/median_ratio",
    ):
        assert key in metrics and metrics[key] is not None, key
    assert 0.0 <= metrics["eval/precision"] <= 1.0 and metrics["eval/fid"] >= 0.0
    identity = record["feature_network"]
    assert identity["kind"] == "self_trained" and identity["steps"] == 10 and len(identity["weights_sha256"]) == 64
    for name in (
        "feature_network.pt",
        "audit.json",
        "memorisation.png",
        "evaluation_summary.json",
        "runs_comparison.png",
        "best_alias.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "best_alias.json").read_text())["decision"] == "moved"  # the first evaluation becomes best
    assert "best alias moved" in out_text

    client = mlflow.MlflowClient()
    best = client.get_model_version_by_alias("trust-review", "best")
    assert best.tags["medsynth.comparison_key"] == record["comparison_key"]
    runs = client.search_runs(
        [client.get_experiment_by_name("trust-review").experiment_id], "tags.`medsynth.stage` = 'evaluate'"
    )
    evaluate_run = runs[0]
    assert evaluate_run.data.params["eval.feature_network"].startswith("{")
    assert evaluate_run.data.tags["medsynth.comparison_key"] == record["comparison_key"]
    parent = evaluate_run.data.tags["mlflow.parentRunId"]
    parent_files = {f.path for f in client.list_artifacts(parent)}
    assert {"evaluation_summary.json", "runs_comparison.png"} <= parent_files
    assert client.get_run(parent).data.metrics["eval/fid"] == pytest.approx(metrics["eval/fid"])

    # Same inputs and seed: identical metrics; the second evaluation sees the first in its table.
    code, _, err = run_cli(["evaluate", str(config), "--force"], capsys)
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["metrics"] == record["metrics"] and again["comparison_key"] == record["comparison_key"]
    summary = json.loads((out / "evaluation_summary.json").read_text())
    assert (
        len(summary["rows"]) == 2
        and summary["rows"][0]["this_run"]
        and summary["rows"][1]["eval/fid"] == pytest.approx(metrics["eval/fid"])
    )
    assert json.loads((out / "best_alias.json").read_text())["decision"] == "kept"  # the same version already holds it


def test_audit_refuses_flagged_cases_or_drops_them(write_config, tmp_path: Path, capsys) -> None:
    config = write_config()
    code, _, err = run_cli(["run", str(config), "stages=[prepare,train]"], capsys)
    assert code == 0, err
    # A threshold no sample can pass: every case flagged. Refuse: one line, exit 2, no augment folder.
    code, _, err = run_cli(["augment", str(config), "augment.audit.threshold=1000"], capsys)
    one_line_exit_2(code, err, "augment.audit", "4 of 4 synthetic cases", "augment.audit.action=drop")
    assert not (tmp_path / "out" / "augment").exists()
    # Drop: the stage completes, says how many it dropped, and the datalist has no synthetic case.
    code, out_text, err = run_cli(
        ["augment", str(config), "augment.audit.threshold=1000", "augment.audit.action=drop"], capsys
    )
    assert code == 0, err
    assert "dropped 4 of 4 synthetic cases" in out_text
    augment = tmp_path / "out" / "augment"
    datalist = json.loads((augment / "datalist_augmented.json").read_text())
    assert not [e for e in datalist["training"] if e.get("synthetic")] and not list(
        (augment / "synthetic").glob("*.nii.gz")
    )
    assert len(json.loads((augment / "audit.json").read_text())["per_scan"]) == 4
    # The default threshold: an untrained model's noise copies nobody; every sidecar carries its ratios.
    code, _, err = run_cli(["augment", str(config)], capsys)
    assert code == 0, err
    sidecars = sorted((augment / "synthetic").glob("synthetic_*.json"))
    assert sidecars and all(not json.loads(p.read_text())["memorisation_audit"]["flagged"] for p in sidecars)
    audit = json.loads((augment / "audit.json").read_text())
    assert all(row["image"]["nearest_group"].startswith("training case ") for row in audit["per_scan"])


def test_utility_stage_classification_table(write_config, tmp_path: Path, capsys) -> None:
    config = write_config(CONDITIONAL)
    code, _, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "utility" / "utility.json").read_text())
    assert result["task"] == "classification" and set(result["regimes"]) == {"real", "real+synthetic", "synthetic"}
    for regime in result["regimes"].values():
        assert len(regime["per_seed"]) == 2 and 0.0 <= regime["mean"]["accuracy"] <= 1.0
    assert result["regimes"]["real+synthetic"]["n_synthetic"] >= 1
    assert (tmp_path / "out" / "utility" / "utility.png").stat().st_size > 1000
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "augment" / "synthetic_classes.npy")[:4], [0, 1, 0, 1])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "stage utility needs labels to learn"),
        (["utility.task=classification"], "set model.num_classes"),
        (["utility.task=segmentation", "model.num_classes=2"], "add controlnet to stages"),
    ],
)
def test_utility_without_labels_is_refused_before_training(
    write_config, tmp_path: Path, capsys, overrides, expected
) -> None:
    config = write_config({"stages": ["prepare", "train", "augment", "utility"]})
    code, _, err = run_cli(["run", str(config), *overrides], capsys)
    one_line_exit_2(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_synthetic_dicom_export_carries_no_training_identifiers(write_config, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "dicom"
    rng = np.random.default_rng(0)
    for i in range(3):
        hu = (
            rng.normal(0.0, 40.0, (16, 16, 4))
            + np.where(np.hypot(*np.mgrid[-8:8, -8:8]) < 5 + i, 60.0, -900.0)[..., None]
        )
        write_ct_series(folder / f"series_{i}", hu)
    config = write_config(
        {
            "data": {"source": "folder", "folder": str(folder), "modality": None, "val_fraction": 0.34},
            "augment": {"dicom": True},
            "stages": ["prepare", "train", "augment"],
        }
    )
    code, _, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    augment = tmp_path / "out" / "augment"
    series = sorted((augment / "dicom").iterdir())
    datalist = json.loads((augment / "datalist_augmented.json").read_text())
    assert series and all(e["dicom"].startswith("dicom/") for e in datalist["training"] if e.get("synthetic"))
    files = sorted(series[0].glob("*.dcm")) or sorted(p for p in series[0].iterdir() if p.is_file())
    header = pydicom.dcmread(files[0])
    assert "SYNTHETIC" in header.SeriesDescription and "SYNTHETIC" in header.ImageComments
    assert list(header.ImageType)[:2] == ["DERIVED", "SECONDARY"] and header.SOPClassUID == pydicom.uid.CTImageStorage
    assert str(header.PatientName).startswith("SYNTHETIC")
    if shutil.which("dciodvfy"):  # dicom3tools' validator of the standard's IODs
        report = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True).stderr
        assert not [line for line in report.splitlines() if line.startswith("Error")], report
    sidecar = json.loads((augment / "synthetic" / f"{series[0].name}.json").read_text())
    assert str(sidecar["seed"]) in (header.get("DerivationDescription", "") + header.ImageComments)
    for path in augment.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_PATIENT_ID.encode() not in data and FAKE_PATIENT_NAME.encode() not in data, path
    client = mlflow.MlflowClient()
    for run in client.search_runs([client.get_experiment_by_name("medsynth-tests").experiment_id], max_results=20):
        assert not any(FAKE_PATIENT_ID in str(v) or FAKE_PATIENT_NAME in str(v) for v in run.data.params.values())


def test_3d_pipeline_reports_per_plane_feature_metrics(write_config, tmp_path: Path, capsys) -> None:
    config = write_config(
        {
            "stages": ["prepare", "train", "sample", "evaluate"],
            "sample": {"num_samples": 3, "batch_size": 3},
            "evaluate": {"num_real": 2},
        },
        base=TINY_3D,
    )
    code, _, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "evaluate" / "metrics.json").read_text())["metrics"]
    for plane in ("axial", "coronal", "sagittal"):
        assert f"eval/fid/{plane}" in metrics and f"eval/precision/{plane}" in metrics
    assert metrics["eval/fid"] == pytest.approx(
        np.mean([metrics[f"eval/fid/{p}"] for p in ("axial", "coronal", "sagittal")])
    )


def test_feature_weights_file_is_checked_before_any_stage(write_config, tmp_path: Path, capsys) -> None:
    from monai.networks.nets.resnet import ResNetFeatures

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a weights file")
    wrong = tmp_path / "resnet18.pt"
    torch.save(ResNetFeatures("resnet18", pretrained=False, spatial_dims=2, in_channels=1).state_dict(), wrong)
    for path, depth, expected in ((garbage, 10, "not a readable weights file"), (wrong, 10, str(wrong))):
        code, _, err = run_cli(
            [
                "run",
                str(write_config()),
                "evaluate.features.network=file",
                f"evaluate.features.weights={path}",
                f"evaluate.features.depth={depth}",
            ],
            capsys,
        )
        one_line_exit_2(code, err, expected)
        assert not (tmp_path / "out").exists()
    # the right depth: the pipeline runs with the file's features, recorded as such
    good = tmp_path / "resnet10.pt"
    torch.save(ResNetFeatures("resnet10", pretrained=False, spatial_dims=2, in_channels=1).state_dict(), good)
    code, _, err = run_cli(
        [
            "run",
            str(write_config()),
            "stages=[prepare,train,sample,evaluate]",
            "evaluate.features.network=file",
            f"evaluate.features.weights={good}",
        ],
        capsys,
    )
    assert code == 0, err
    identity = json.loads((tmp_path / "out" / "evaluate" / "metrics.json").read_text())["feature_network"]
    assert identity["kind"] == "file" and not (tmp_path / "out" / "evaluate" / "feature_network.pt").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["evaluate.features.network=file"], "evaluate.features.weights"),
        (
            ["evaluate.features.network=file", "evaluate.features.weights=/nonexistent/resnet10.pt"],
            "/nonexistent/resnet10.pt",
        ),
        (["augment.audit.threshold=0"], "augment.audit.threshold"),
        (["augment.audit.action=delete"], "augment.audit.action"),
        (["utility.seeds=[]"], "utility.seeds"),
        (["stages=[prepare,train,utility]"], "add augment to stages"),
        (["tracking.best_direction=up"], "tracking.best_direction"),
        (["tracking.best_alias=latest"], "tracking.best_alias"),
    ],
)
def test_bad_trust_settings_are_one_line_exit_2(write_config, tmp_path: Path, capsys, overrides, expected) -> None:
    code, _, err = run_cli(["run", str(write_config()), *overrides], capsys)
    one_line_exit_2(code, err, expected)
    assert not (tmp_path / "out").exists()
