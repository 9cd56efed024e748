"""The real CLI, end to end, on tiny phantom configs: outputs, cache skips, MLflow records."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_3D
from mlflow import MlflowClient
from monai.data import load_decathlon_datalist

from medsynth.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.slow
def test_quick_pipeline_2d_outputs_cache_and_mlflow(write_config, tmp_path: Path, capsys) -> None:
    config = write_config()
    out = tmp_path / "out"
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    for stage in ("prepare", "train", "sample", "evaluate", "augment"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["outputs"] and manifest["code"]["version"]
        assert (out / stage / "config.yaml").is_file()
    assert not list(out.glob(".*"))  # no work folders left behind

    # Data: real NIfTI + a MONAI datalist that MONAI reads.
    items = load_decathlon_datalist(str(out / "prepare" / "datalist.json"), data_list_key="training")
    assert items and Path(items[0]["image"]).is_file() and Path(items[0]["label"]).is_file()
    # Samples: NIfTI with spacing from the data; a grid.
    sample = nib.load(out / "sample" / "images" / "sample_0000.nii.gz")
    assert sample.shape == (16, 16) and np.allclose(sample.header.get_zooms(), (12.5, 12.5))
    assert (out / "sample" / "grid.png").stat().st_size > 1000
    # Evaluation metrics, augmentation provenance and merged datalist.
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["eval/mmd"]) and "eval/diversity_ms_ssim/fake" in metrics
    merged = load_decathlon_datalist(str(out / "augment" / "datalist_augmented.json"), data_list_key="training")
    synthetic = [m for m in merged if m["synthetic"]]
    assert len(synthetic) == 4 and all(Path(m["image"]).is_file() for m in merged)  # 8 real cases x 0.5
    sidecar = json.loads((out / "augment" / synthetic[0]["provenance"]).read_text())
    assert (
        sidecar["synthetic"] is True
        and sidecar["seed"] == 100000
        and sidecar["train_run_id"]
        and sidecar["config_digest"]
    )

    # MLflow: one parent run, nested stage runs with tags, params, metrics, artifacts, model alias.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("medsynth-tests")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=6)
    stages = {r.data.tags.get("medsynth.stage"): r for r in runs[:6]}
    parent = stages.pop(None)
    assert set(stages) == {"prepare", "train", "sample", "evaluate", "augment"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    train_run = stages["train"]
    assert (
        train_run.data.params["train.max_steps"] == "4"
        and "train/loss" in train_run.data.metrics
        and "val/loss" in train_run.data.metrics
    )
    assert train_run.inputs.dataset_inputs and train_run.inputs.dataset_inputs[0].dataset.digest
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"loss_curve.png", "config.yaml"} <= artifacts
    assert "grid.png" in {a.path for a in client.list_artifacts(stages["sample"].info.run_id)}
    assert "eval/mmd" in stages["evaluate"].data.metrics
    version = client.get_model_version_by_alias("medsynth-tests", "current")
    assert version.run_id == train_run.info.run_id
    model = mlflow.pytorch.load_model("models:/medsynth-tests@current")
    assert sum(p.numel() for p in model.parameters()) > 0

    # Unchanged: everything skipped, no new MLflow runs.
    before = len(client.search_runs([experiment.experiment_id]))
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0 and err.count("unchanged, skipped") == 5
    assert len(client.search_runs([experiment.experiment_id])) == before
    # A stage whose own outputs are unchanged still refuses upstream outputs made from another config.
    code, err = run_cli(["evaluate", str(config), "data.phantom.count=11"], capsys)
    assert code == 2 and "stage 'prepare'" in err and "another config" in err
    # A changed sample section reruns sample and what reads it, not prepare/train.
    code, err = run_cli(["run", str(config), "sample.seed=5"], capsys)
    assert code == 0
    assert (
        "prepare: unchanged" in err
        and "train: unchanged" in err
        and "sample: running" in err
        and "evaluate: running" in err
    )
    # --force reruns a single stage.
    code, err = run_cli(["prepare", str(config), "--force"], capsys)
    assert code == 0 and "prepare: running" in err
    # One stage alone refuses to build on outputs made from another data config.
    code, err = run_cli(["sample", str(config), "data.phantom.count=11"], capsys)
    assert code == 2 and "stage 'prepare'" in err and "another config" in err


@pytest.mark.slow
def test_pipeline_3d_runs_end_to_end(write_config, tmp_path: Path, capsys) -> None:
    config = write_config(base=TINY_3D)
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    sample = nib.load(tmp_path / "out" / "sample" / "images" / "sample_0000.nii.gz")
    assert sample.shape == (16, 16, 16) and sample.get_data_dtype() == np.int16  # CT in HU
    assert -1024 <= sample.get_fdata().min() and sample.get_fdata().max() <= 1000


@pytest.mark.slow
def test_single_stage_needs_its_inputs(write_config, capsys) -> None:
    code, err = run_cli(["sample", str(write_config())], capsys)
    assert code == 2 and "needs the outputs of stage 'prepare'" in err and err.count("\n") == 1


@pytest.mark.slow
def test_same_config_and_seed_give_identical_outputs(write_config, tmp_path: Path, capsys) -> None:
    digests = []
    for name in ("first", "second"):
        config = write_config(
            {"output_dir": str(tmp_path / name), "stages": ["prepare", "train", "sample"]}, name=f"{name}.yaml"
        )
        assert main(["run", str(config)]) == 0
        outputs = {}
        for stage in ("prepare", "train", "sample"):
            manifest = json.loads((tmp_path / name / stage / "manifest.json").read_text())["outputs"]
            outputs.update({f"{stage}/{k}": v["sha256"] for k, v in manifest.items()})
        digests.append(outputs)
    capsys.readouterr()
    for key in (
        "prepare/cache/train_images.npy",
        "prepare/images/phantom_0000.nii.gz",
        "train/model.pt",
        "sample/samples.npy",
        "sample/images/sample_0000.nii.gz",
    ):
        assert digests[0][key] == digests[1][key], key
