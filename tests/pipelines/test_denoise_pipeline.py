"""prepare -> train -> denoise -> evaluate through the real CLI, for MR (Rician) and CT (low dose in the
projection domain): files per level, case and method, the PSNR/SSIM table in MLflow, the plot and the
side-by-side figure. Plus the denoise section's config errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main

DENOISE = {
    "stages": ["prepare", "train", "denoise", "evaluate"],
    "data": {"phantom": {"noise": 0.0}},
    "diffusion": {"schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 0.02},
    "denoise": {"methods": ["diffusion", "tv", "wavelet"], "num_images": 2, "levels": [0.05, 0.1]},
}


@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_denoise_pipeline_end_to_end(modality, write_config, tmp_path: Path, capsys) -> None:
    extra = dict(
        DENOISE, name=f"tiny-denoise-{modality}", tracking={"experiment": f"medsynth-tests-denoise-{modality}"}
    )
    if modality == "ct":
        # 16-pixel CT phantoms hold too little uniform soft tissue to estimate the noise from: the oracle level.
        extra = extra | {
            "data": {"phantom": {"kind": "body_ct", "noise": 0.0}},
            "denoise": DENOISE["denoise"] | {"levels": [0.25, 0.1], "sigma": "oracle"},
        }
    if modality == "mr":
        # Your own noisy scans too: a datalist with one NIfTI file (relative path), denoised by every method.
        own = tmp_path / "own"
        own.mkdir()
        rng = np.random.default_rng(0)
        scan = np.abs(
            np.pad(np.full((12, 12), 100.0), 2) + rng.normal(0, 5, (16, 16)) + 1j * rng.normal(0, 5, (16, 16))
        ).astype(np.float32)
        nib.save(nib.Nifti1Image(scan, np.diag([13.75, 13.75, 1.0, 1.0])), own / "noisy scan.nii.gz")
        (own / "list.json").write_text(json.dumps({"testing": [{"image": "noisy scan.nii.gz"}]}))
        extra = extra | {"denoise": DENOISE["denoise"] | {"datalist": str(own / "list.json")}}
    config = write_config(extra)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"

    record = json.loads((out / "denoise" / "denoise.json").read_text())
    assert record["noise"] == ("low_dose_ct" if modality == "ct" else "rician") and len(record["entries"]) == 4
    entry = record["entries"][0]
    for method in ("diffusion", "tv", "wavelet"):
        image = nib.load(out / "denoise" / entry["methods"][method]["file"]).get_fdata()
        assert image.shape == (16, 16) and np.isfinite(image).all()
        # MR: estimated from the image (sigma: auto); CT: the simulated level (oracle)
        assert entry["methods"][method]["sigma"] > 0 and (
            modality == "mr" or entry["methods"][method]["sigma"] == entry["true_sigma"]
        )
    assert entry["true_sigma"] > 0

    metrics = json.loads((out / "evaluate" / "denoise_metrics.json").read_text())
    rows = metrics["table"]
    assert {(r["level"], r["method"]) for r in rows} == {
        (lv, m) for lv in record["levels"] for m in ("noisy", "diffusion", "tv", "wavelet")
    }
    assert all(np.isfinite([r["psnr"], r["ssim"], r["psnr_fg"], r["ssim_fg"], r["slope_fg"]]).all() for r in rows)
    assert all("slope_fg" in r for r in metrics["per_image"])
    # A baseline must beat the noisy input at the strongest noise (a check that the scoring is the right way round).
    strongest = record["levels"][-1] if modality == "mr" else min(record["levels"])
    at = {r["method"]: r for r in rows if r["level"] == strongest}
    assert max(at["tv"]["psnr"], at["wavelet"]["psnr"]) > at["noisy"]["psnr"]
    for name in ("psnr_vs_noise.png", "denoise_comparison.png"):
        assert (out / "evaluate" / name).stat().st_size > 1000

    run = mlflow.search_runs(
        experiment_names=[f"medsynth-tests-denoise-{modality}"],
        filter_string="tags.`medsynth.stage` = 'evaluate'",
        output_format="list",
    )[0]
    assert any(k.startswith("denoise/diffusion/") for k in run.data.metrics)
    assert {f"denoise/{m}/{lv}/slope_fg" for m in ("noisy", "tv", "wavelet") for lv in record["levels"]} <= set(
        run.data.metrics
    )
    assert any(k.startswith("denoise/gain_over_best_classical/") for k in run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"denoise_table.json", "psnr_vs_noise.png", "denoise_comparison.png"} <= artifacts

    # Unchanged config: everything cached.
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert capsys.readouterr().out.count("unchanged, skipped") == 4

    if modality == "mr":
        (scan_record,) = record["scans"]
        assert scan_record["name"] == "noisy_scan" and set(scan_record["outputs"]) == {"diffusion", "tv", "wavelet"}
        for method, written in scan_record["outputs"].items():
            image = nib.load(out / "denoise" / written["output"])
            assert image.shape == (16, 16) and np.allclose(image.affine, np.diag([13.75, 13.75, 1.0, 1.0]))
            assert written["sigma_source"] == "estimated" and written["sigma"] > 0
            assert (out / "denoise" / "scans" / "noisy_scan" / f"{method}.json").is_file()  # provenance beside it
        # Editing a listed scan invalidates the denoise stage (and what reads it), nothing else.
        nib.save(nib.Nifti1Image(scan * 1.5, np.diag([13.75, 13.75, 1.0, 1.0])), own / "noisy scan.nii.gz")
        assert main(["run", str(config)]) == 0
        printed = capsys.readouterr().out
        assert printed.count("unchanged, skipped") == 2 and "denoise: done" in printed


@pytest.mark.parametrize(
    "denoise, expected",
    [
        ({"samples": 3}, "needs mode 'ancestral'"),
        ({"sigma": -1.0}, "denoise.sigma"),
        ({"noise": "low_dose_ct"}, "does not fit modality 'mr'"),
        ({"levels": [0.0]}, "denoise.levels"),
        ({"methods": ["median"]}, "denoise.methods"),
        ({"datalist_key": ""}, "denoise.datalist_key"),
    ],
)
def test_denoise_config_errors(denoise, expected, write_config, capsys) -> None:
    config = write_config({"stages": DENOISE["stages"], "denoise": denoise})
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_evaluate_needs_sample_or_denoise_outputs(write_config, capsys) -> None:
    config = write_config({"stages": ["prepare", "train", "denoise", "evaluate"]})
    assert main(["evaluate", str(config)]) == 2
    assert "stage 'evaluate' needs the outputs of stage 'prepare'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "datalist not found"),
        ("{not json", "not a readable JSON datalist"),
        ('{"training": []}', "has no key 'testing'"),
        ('{"testing": []}', "must be a non-empty list"),
        ('{"testing": [{"label": "x"}]}', "entry 0: expected a path"),
        ('{"testing": ["missing.nii.gz"]}', "missing.nii.gz not found"),
    ],
)
def test_bad_denoise_datalist_is_one_line_and_writes_nothing(
    content, expected, write_config, tmp_path: Path, capsys
) -> None:
    listing = tmp_path / "list.json"
    if content is not None:
        listing.write_text(content)
    config = write_config(
        {
            "stages": ["prepare", "train", "denoise"],
            "denoise": {"methods": ["tv"], "num_images": 1, "datalist": str(listing)},
        }
    )
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "list.json" in err
    assert not (tmp_path / "out").exists()  # checked before the first stage ran


def test_a_denoising_prior_cannot_be_sampled_by_the_pipeline(write_config, capsys) -> None:
    config = write_config({"diffusion": {"max_train_timestep": 50}})  # default stages sample and augment
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_train_timestep" in err and "cannot sample" in err
