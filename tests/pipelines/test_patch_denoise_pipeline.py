"""Native-resolution denoising priors through the real CLI: a folder of NIfTI volumes, patch training
(whole scans cached at their own spacing, random crops), the clean prior and the self-supervised prior
(fitted per noisy case, no clean image) scored with the contrast slope; and the patch config errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from medsynth.cli import main
from medsynth.data.phantoms import generate_phantom


def volumes(folder: Path, count: int = 4, shape=(40, 36, 6)) -> Path:
    """Brain phantom volumes of 40x36 voxels (1.5 mm) with 6 slices: bigger than the 16x16 crops."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = generate_phantom("brain_mri", (shape[0], shape[1], 16), i, noise_std=0.0).image[..., 5 : 5 + shape[2]]
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.5, 1.5, 3.0, 1.0])), folder / f"scan_{i}.nii.gz")
    return folder


PATCH = {
    "stages": ["prepare", "train", "denoise", "evaluate"],
    "data": {
        "source": "folder",
        "modality": "mr",
        "image_size": [16, 16],
        "patches": {"per_scan": 2, "cached": 4},
        "val_fraction": 0.25,
    },
    "diffusion": {"schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 0.02, "max_train_timestep": 60},
    "denoise": {"methods": ["diffusion", "self_supervised", "tv"], "num_images": 1, "levels": [0.1], "draws": 2},
}


@pytest.mark.slow
def test_patch_training_and_both_priors_end_to_end(write_config, tmp_path: Path, capsys) -> None:
    folder = volumes(tmp_path / "scans")
    config = write_config(PATCH | {"data": PATCH["data"] | {"folder": str(folder)}, "name": "tiny-patches"})
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    cache = out / "prepare" / "cache"
    index = json.loads((cache / "train_volumes.json").read_text())
    assert len(index["rows"]) == 3 and index["rows"][0]["shape"] == [40, 36, 6]  # whole scans, never resized
    assert np.load(cache / "train_volumes" / "0000.npy").shape == (1, 40, 36, 6)
    assert np.load(cache / "train_images.npy").shape == (12, 1, 16, 16)  # 4 fixed crops per scan
    model = torch.load(out / "train" / "model.pt", weights_only=True)
    assert model["image_size"] == [16, 16] and model["data"]["patches"]["per_scan"] == 2
    assert model["data"]["spacing_mm"] == [1.5, 1.5]

    record = json.loads((out / "denoise" / "denoise.json").read_text())
    entry = record["entries"][0]
    for method in ("diffusion", "self_supervised", "tv"):
        image = nib.load(out / "denoise" / entry["methods"][method]["file"]).get_fdata()
        assert image.shape == (40, 36, 6) and np.isfinite(image).all()
    assert (out / "denoise" / "fits" / "level_0_case_0" / "model.pt").is_file()  # the case's own prior
    fitted = torch.load(out / "denoise" / "fits" / "level_0_case_0" / "model.pt", weights_only=True)
    assert fitted["data"]["self_supervised"] is True and fitted["data"]["training_scans"] == 1
    rows = json.loads((out / "evaluate" / "denoise_metrics.json").read_text())["table"]
    assert {r["method"] for r in rows} == {"noisy", "diffusion", "self_supervised", "tv"}
    assert all(np.isfinite(r["slope_fg"]) for r in rows)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"train": {"batch_size": 3}}, "train.batch_size 3 must be a multiple of data.patches.per_scan 2"),
        ({"data": {"image_size": [48, 48]}}, "is smaller than the 48x48 patch"),
        (
            {"data": {"patches": None}, "stages": ["prepare", "denoise"], "denoise": {"methods": ["self_supervised"]}},
            "self_supervised fits a pixel-space prior on crops of each noisy scan: set data.patches",
        ),
    ],
)
def test_patch_config_errors_are_one_line(change, expected, write_config, tmp_path: Path, capsys) -> None:
    folder = volumes(tmp_path / "scans", count=2)
    extra = PATCH | {"data": PATCH["data"] | {"folder": str(folder)} | change.get("data", {})}
    extra |= {k: v for k, v in change.items() if k != "data"}
    experiment = f"patch-errors-{tmp_path.name}"
    config = write_config(extra | {"tracking": {"experiment": experiment}})
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "prepare").exists()
    # refused before any MLflow run: a scan too small for the patch is found by the prepare stage's preflight
    found = MlflowClient().get_experiment_by_name(experiment)
    assert found is None or not MlflowClient().search_runs([found.experiment_id])
