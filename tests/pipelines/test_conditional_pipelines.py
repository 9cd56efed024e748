"""Class-conditional (classifier-free guidance), latent and ControlNet pipelines through the real CLI on
tiny phantoms, and their bad inputs (one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_exit_2

from medsynth.cli import main

CFG = {
    "data": {"phantom": {"count": 16, "lesion_size": 3.0}},
    "model": {"num_classes": 2},
    "train": {"label_dropout": 0.2},
    "sample": {"sampler": "heun", "steps": 4, "guidance_scale": 2.0},
    "evaluate": {"classifier_steps": 20},
}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr (stage status lines go to stdout)."""
    code = main(args)
    return code, capsys.readouterr().err


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
    for key in (
        "eval/class/agreement",
        "eval/class/real_accuracy",
        "eval/class/0/agreement",
        "eval/class/1/diversity_ms_ssim",
    ):
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


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["sample.guidance_scale=3"], "sample.guidance_scale needs a class-conditional model"),
        (["sample.class_label=1"], "sample.class_label needs a class-conditional model"),
        (["model.num_classes=2", "sample.class_label=2"], "outside the model's classes 0..1"),
        (["model.num_classes=2", "sample.class_label=[]"], "empty list"),
        (["model.num_classes=2", "sample.guidance_scale=-1"], "sample.guidance_scale"),
        (["train.label_dropout=1.0"], "train.label_dropout"),
    ],
)
def test_bad_guidance_settings_are_one_line_exit_2(write_config, tmp_path: Path, capsys, overrides, expected) -> None:
    code, err = run_cli(["run", str(write_config()), *overrides], capsys)
    one_line_exit_2(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_class_conditional_model_on_data_without_classes_is_one_line_exit_2(
    write_config, tmp_path: Path, capsys
) -> None:
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        nib.save(
            nib.Nifti1Image(rng.uniform(0, 100, (16, 16, 4)).astype(np.float32), np.eye(4)), folder / f"scan{i}.nii.gz"
        )
    config = write_config(
        {
            "data": {"source": "folder", "folder": str(folder), "modality": "mr", "val_fraction": 0.25},
            "model": {"num_classes": 2},
        }
    )
    code, err = run_cli(["run", str(config), "--stages", "prepare,train"], capsys)
    one_line_exit_2(code, err, "images without a class label", "model.num_classes=2")
    assert not (tmp_path / "out" / "train").exists() and not list((tmp_path / "out").glob(".train*"))


LATENT = {
    "stages": ["prepare", "autoencoder", "train", "sample", "evaluate"],
    "diffusion": {"space": "latent"},
    "autoencoder": {
        "channels": [8, 16],
        "latent_channels": 2,
        "norm_num_groups": 8,
        "batch_size": 4,
        "max_steps": 4,
        "adv_start": 2,
        "disc_channels": 8,
        "disc_layers": 2,
        "val_images": 2,
        "val_every": 2,
        "log_every": 2,
    },
}


def test_latent_pipeline_trains_autoencoder_then_diffusion_on_latents(write_config, tmp_path: Path, capsys) -> None:
    from mlflow import MlflowClient

    from medsynth.models.loading import load_trained_model

    config = write_config(LATENT)
    out = tmp_path / "out"
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    for name in ("autoencoder.pt", "reconstructions.png", "loss_curve.png", "manifest.json"):
        assert (out / "autoencoder" / name).is_file(), name
    summary = json.loads((out / "autoencoder" / "manifest.json").read_text())["summary"]
    assert summary["latent_shape"] == [2, 8, 8] and summary["scale_factor"] > 0
    trained = load_trained_model(out / "train" / "model.pt")
    assert trained.is_latent and trained.image_size == [8, 8] and trained.output_size == [16, 16]
    assert trained.network.in_channels == 2
    assert np.load(out / "train" / "latents_train.npy").shape[1:] == (2, 8, 8)
    samples = np.load(out / "sample" / "samples.npy")
    assert samples.shape == (4, 1, 16, 16) and np.isfinite(samples).all()
    # MLflow: the autoencoder stage's run has reconstruction metrics and the figure
    manifest = json.loads((out / "autoencoder" / "manifest.json").read_text())
    run = MlflowClient().get_run(manifest["mlflow_run_id"])
    assert {"val/psnr", "val/ssim", "autoencoder/scale_factor"} <= set(run.data.metrics)
    assert "reconstructions.png" in [a.path for a in MlflowClient().list_artifacts(run.info.run_id)]

    # a changed autoencoder retrains the latent model (its digest is an input of train)
    code, err = run_cli(["run", str(config), "autoencoder.max_steps=5", "--stages", "autoencoder,train"], capsys)
    assert code == 0, err
    assert load_trained_model(out / "train" / "model.pt").autoencoder.step == 5


def test_latent_3d_samples_decode_with_a_sliding_window(write_config, tmp_path: Path, capsys) -> None:
    from conftest import TINY_3D

    config = write_config(
        {
            **LATENT,
            "stages": ["prepare", "autoencoder", "train", "sample"],
            "autoencoder": {
                **LATENT["autoencoder"],
                "batch_size": 2,
                "patch_size": [8, 8, 8],
                "disc_layers": 1,
                "decode_roi": [4, 4, 4],
            },
            "sample": {"sampler": "dpmpp_2m", "steps": 3, "num_samples": 2, "batch_size": 2},
        },
        base=TINY_3D,
    )
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    samples = np.load(tmp_path / "out" / "sample" / "samples.npy")
    assert samples.shape == (2, 1, 16, 16, 16) and np.isfinite(samples).all()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["diffusion.space=latent", "data.image_size=[18, 18]", "data.phantom.shape=[18, 18]"],
            "divisible by the autoencoder's downsampling 4",
        ),
        (["diffusion.space=latent", "stages=[prepare, train, denoise]"], "stage denoise needs a pixel-space model"),
        (["autoencoder.perceptual_weight=0.1"], "perceptual_weights"),
        (["autoencoder.patch_size=[6, 6]"], "autoencoder.patch_size"),
        (["autoencoder.decode_roi=[4, 4, 4]"], "autoencoder.decode_roi"),
    ],
)
def test_bad_latent_settings_are_one_line_exit_2(write_config, tmp_path: Path, capsys, overrides, expected) -> None:
    code, err = run_cli(["run", str(write_config()), *overrides], capsys)
    one_line_exit_2(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_latent_model_needs_the_autoencoder_stage_first(write_config, tmp_path: Path, capsys) -> None:
    config = write_config(LATENT)
    code, err = run_cli(["run", str(config), "--stages", "prepare,train"], capsys)
    one_line_exit_2(code, err, "needs the outputs of stage 'autoencoder'")


CONTROL = {
    "stages": ["prepare", "train", "controlnet", "sample", "evaluate", "augment", "utility"],
    "controlnet": {"conditioning_channels": [8], "max_steps": 4, "batch_size": 4, "log_every": 2},
}


def test_controlnet_pipeline_generates_paired_images_and_labels(write_config, tmp_path: Path, capsys) -> None:
    import nibabel as nib

    config = write_config(CONTROL)
    out = tmp_path / "out"
    code, err = run_cli(["run", str(config)], capsys)
    assert code == 0, err
    assert (out / "controlnet" / "controlnet.pt").is_file()
    maps = np.load(out / "sample" / "sample_labels.npy")
    val_maps = np.load(out / "prepare" / "cache" / "val_labels.npy")
    assert maps.shape == (4, 1, 16, 16) and np.array_equal(maps[0], val_maps[0])
    label_file = nib.load(out / "sample" / "labels" / "sample_0000.nii.gz")
    assert np.array_equal(np.asarray(label_file.dataobj), maps[0, 0])
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())["metrics"]
    for key in (
        "eval/label/dice",
        "eval/label/dice_real",
        "eval/label/dice_shuffled",
        "eval/label/mean_abs_difference",
    ):
        assert np.isfinite(metrics[key]), key
    datalist = json.loads((out / "augment" / "datalist_augmented.json").read_text())
    synthetic = [e for e in datalist["training"] if e.get("synthetic")]
    assert synthetic and all((out / "augment" / e["label"]).is_file() for e in synthetic)
    # utility: a MONAI UNet segments held-out real images after training on real / real + synthetic / synthetic pairs
    utility = json.loads((out / "utility" / "utility.json").read_text())
    assert utility["task"] == "segmentation" and utility["metric"] == "dice"
    assert all(0.0 <= r["mean"]["dice"] <= 1.0 for r in utility["regimes"].values())
    assert np.load(out / "augment" / "synthetic_labels.npy").shape[1:] == (1, 16, 16)

    # your own label maps: a folder of NIfTI maps of the model's size
    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(val_maps[i, 0].astype(np.uint8), np.eye(4)), folder / f"map{i}.nii.gz")
    code, err = run_cli(["sample", str(config), f"controlnet.label_maps={folder}"], capsys)
    assert code == 0, err
    record = json.loads((out / "sample" / "samples.json").read_text())
    assert record["label_maps"][:2] == [str(folder / "map0.nii.gz"), str(folder / "map1.nii.gz")]

    # a label map of the wrong shape -> one line, exit 2, the sample stage's outputs untouched
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12), np.uint8), np.eye(4)), bad)
    before = (out / "sample" / "samples.json").read_text()
    code, err = run_cli(["sample", str(config), f"controlnet.label_maps={bad}"], capsys)
    one_line_exit_2(code, err, str(bad))
    assert (out / "sample" / "samples.json").read_text() == before
    code, err = run_cli(["sample", str(config), f"controlnet.label_maps={tmp_path / 'missing'}"], capsys)
    one_line_exit_2(code, err, "not found")
    too_high = tmp_path / "high.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16), 99, np.uint8), np.eye(4)), too_high)
    code, err = run_cli(["sample", str(config), f"controlnet.label_maps={too_high}"], capsys)
    one_line_exit_2(code, err, "outside")


def test_controlnet_stage_refuses_latent_models_and_wide_embeddings(write_config, tmp_path: Path, capsys) -> None:
    code, err = run_cli(["run", str(write_config(CONTROL)), "controlnet.conditioning_channels=[8, 16]"], capsys)
    one_line_exit_2(code, err, "controlnet.conditioning_channels needs one entry")
    code, err = run_cli(["run", str(write_config({**CONTROL, **LATENT, "stages": CONTROL["stages"]}))], capsys)
    one_line_exit_2(code, err, "stage controlnet is built for pixel-space models")
