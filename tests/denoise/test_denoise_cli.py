"""``medsynth denoise INPUT OUTPUT`` through the real CLI: NIfTI and DICOM in and out, 2D models
slice-wise, 3D models windowed over volumes larger than their training size, MLflow model URIs,
posterior draws, and bad inputs: missing, corrupt, truncated, wrong shape or dtype, bad paths (one line,
exit code 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import TINY, TINY_3D, deep_update
from dicom_factory import write_ct_series, write_rt_struct, write_unsupported_compressed_slice

from medsynth.cli import main
from medsynth.data.phantoms import generate_phantom
from medsynth.io.volumes import read_dicom_series
from medsynth.metrics.restoration import foreground, restoration_metrics
from medsynth.noise.models import rician_noise


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors (unknown choice) exit through SystemExit
        code = int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code: int, err: str, output: Path, *expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not output.exists(), f"{output} was written"
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(".")] if output.parent.exists() else []
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def _train(tmp_path_factory, base: dict, name: str) -> Path:
    import yaml

    folder = tmp_path_factory.mktemp(name)
    config = deep_update(
        base,
        {"output_dir": str(folder / "out"), "name": name, "tracking": {"registered_model": f"medsynth-tests-{name}"}},
    )
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    stages = [s for s in config.get("stages", []) if s in ("prepare", "autoencoder", "train")] or ["prepare", "train"]
    assert main(["run", str(path), "--stages", ",".join(stages)]) == 0
    return folder / "out" / "train" / "model.pt"


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, TINY, "denoise2d")


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, TINY_3D, "denoise3d")


def brain_nifti(path: Path, shape=(16, 16), noise=0.05, seed=0) -> tuple[Path, np.ndarray]:
    clean = generate_phantom("brain_mri", shape, seed, noise_std=0.0).image
    noisy = rician_noise(clean, noise * float(np.percentile(clean, 99)), seed=seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), affine), path)
    return path, clean


# --- NIfTI -----------------------------------------------------------------------------------------


def test_nifti_2d_diffusion_keeps_header_and_records_provenance(model_2d, tmp_path, capsys):
    source, clean = brain_nifti(tmp_path / "in" / "scan.nii.gz")
    out = tmp_path / "out" / "scan_denoised.nii.gz"
    code, stdout, err = run_cli(["denoise", source, out, "--checkpoint", model_2d], capsys)
    assert code == 0, err
    img, ref = nib.load(out), nib.load(source)
    assert (
        img.shape == ref.shape and np.allclose(img.affine, ref.affine) and img.get_data_dtype() == ref.get_data_dtype()
    )
    assert np.isfinite(img.get_fdata()).all()
    record = json.loads((tmp_path / "out" / "scan_denoised.json").read_text())
    assert record["denoise"]["method"] == "diffusion" and record["denoise"]["sigma_source"] == "estimated"
    assert (
        record["denoise"]["rician_bias_correction"] == "output"
        and len(record["input_digest"]) == 64
        and record["model_digest"]
    )
    assert "version" in record["code_version"] and "sigma" in stdout


def test_nifti_volume_with_a_2d_model_is_denoised_slice_by_slice(model_2d, tmp_path, capsys):
    clean = generate_phantom("brain_mri", (24, 20, 16), 1, noise_std=0.0).image[..., 5:11]
    noisy = rician_noise(clean, 0.05 * float(np.percentile(clean, 99)), seed=1)
    source = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(noisy, np.diag([2.0, 2.0, 4.0, 1.0])), source)
    out = tmp_path / "vol_dn.nii"
    code, _, err = run_cli(["denoise", source, out, "--checkpoint", model_2d, "--mode", "ddim", "--steps", "3"], capsys)
    assert code == 0, err
    assert nib.load(out).shape == (24, 20, 6)


def test_ensemble_averages_the_mirror_images_and_says_so(model_2d, tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    plain, mirrored = tmp_path / "plain.nii.gz", tmp_path / "ensemble.nii.gz"
    assert run_cli(["denoise", source, plain, "--checkpoint", model_2d], capsys)[0] == 0
    code, _, err = run_cli(["denoise", source, mirrored, "--checkpoint", model_2d, "--ensemble"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "ensemble.json").read_text())["denoise"]
    # the test model was trained without data.patches.rotations: the 4 mirror images of the plane only
    assert record["ensemble"] == 4 and record["network_evaluations"] == 4
    assert json.loads((tmp_path / "plain.json").read_text())["denoise"]["ensemble"] == 1
    a, b = nib.load(plain).get_fdata(), nib.load(mirrored).get_fdata()
    assert np.isfinite(b).all() and not np.allclose(a, b)  # an untrained-for-symmetry network is not its own mirror


def test_a_one_slice_volume_comes_back_in_its_own_shape(model_2d, tmp_path, capsys):
    """(X, Y, 1) NIfTI (a single-slice scan) goes through a 2D model and comes back (X, Y, 1), not (X, Y)."""
    from medsynth.denoise.scan import denoise_scan
    from medsynth.models.loading import load_trained_model

    clean = generate_phantom("brain_mri", (16, 16, 16), 1, noise_std=0.0).image[..., 8:9]
    noisy = rician_noise(clean, 0.05 * float(np.percentile(clean, 99)), seed=1)
    result = denoise_scan(noisy, np.eye(4), method="diffusion", modality="mr", trained=load_trained_model(model_2d))
    assert result.image.shape == (16, 16, 1)
    source, out = tmp_path / "one.nii.gz", tmp_path / "one_dn.nii.gz"
    nib.save(nib.Nifti1Image(noisy, np.eye(4)), source)
    code, _, err = run_cli(["denoise", source, out, "--checkpoint", model_2d], capsys)
    assert code == 0, err
    assert nib.load(out).shape == (16, 16, 1)


def test_posterior_draws_write_an_uncertainty_map(model_2d, tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "dn.nii.gz"
    code, _, err = run_cli(
        ["denoise", source, out, "--checkpoint", model_2d, "--mode", "ancestral", "--steps", "3", "--samples", "3"],
        capsys,
    )
    assert code == 0, err
    spread = nib.load(tmp_path / "dn_uncertainty.nii.gz").get_fdata()
    assert spread.shape == (16, 16) and spread.max() > 0


@pytest.mark.parametrize("method", ["nlm", "tv", "wavelet"])
def test_classical_methods_need_no_model(method, tmp_path, capsys):
    source, clean = brain_nifti(tmp_path / "scan.nii.gz", shape=(32, 32), noise=0.05)
    out = tmp_path / f"{method}.nii.gz"
    code, _, err = run_cli(["denoise", source, out, "--method", method, "--modality", "mr"], capsys)
    assert code == 0, err
    noisy = nib.load(source).get_fdata()
    assert np.mean((nib.load(out).get_fdata() - clean) ** 2) < np.mean((noisy - clean) ** 2)


# bm3d/bm4d come with the dev extra: a missing package fails here rather than skipping. A 3D input goes
# to BM4D as a whole volume (medsynth.denoise.classical.bm3d dispatches on ndim).
@pytest.mark.parametrize("shape", [pytest.param((48, 48), id="bm3d-2d"), pytest.param((24, 24, 24), id="bm4d-3d")])
def test_bm3d_through_the_cli(shape, tmp_path, capsys):
    source, clean = brain_nifti(tmp_path / "scan.nii.gz", shape=shape, noise=0.05)
    out = tmp_path / "bm3d.nii.gz"
    code, stdout, err = run_cli(["denoise", source, out, "--method", "bm3d", "--modality", "mr"], capsys)
    assert code == 0, err
    result = nib.load(out).get_fdata()
    assert result.shape == shape and np.isfinite(result).all()
    record = json.loads((tmp_path / "bm3d.json").read_text())["denoise"]
    assert record["method"] == "bm3d" and record["sigma_source"] == "estimated" and "bm3d" in stdout
    mask, data_range = foreground(clean, "mr"), float(clean.max() - clean.min())
    noisy = restoration_metrics(nib.load(source).get_fdata(), clean, data_range=data_range, mask=mask)
    denoised = restoration_metrics(result, clean, data_range=data_range, mask=mask)
    # Measured on seeds 0-2 (sigma estimated): +0.7..1.0 dB (2D), +0.7..0.8 dB (3D) in the foreground.
    assert denoised["psnr_fg"] > noisy["psnr_fg"] + 0.3, (noisy["psnr_fg"], denoised["psnr_fg"])


def test_model_uri_from_the_registry(model_2d, tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "dn.nii.gz"
    code, _, err = run_cli(["denoise", source, out, "--model-uri", "models:/medsynth-tests-denoise2d@current"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "dn.json").read_text())
    assert record["model_digest"] and record["model_uri"] == "models:/medsynth-tests-denoise2d@current"


# --- 3D: windows larger than the training size ----------------------------------------------------


def test_3d_model_on_a_larger_volume_has_no_seams(model_3d, tmp_path, capsys):
    """A 40 x 40 x 24 CT volume through a 16^3 model: windows start every 8 voxels. A seam would show
    as a jump between neighbouring planes at window borders larger than between other planes."""
    rng = np.random.default_rng(0)
    hu = (40.0 + rng.normal(0.0, 30.0, (40, 40, 24))).astype(np.float32)
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0])), source)
    out = tmp_path / "ct_dn.nii.gz"
    code, _, err = run_cli(["denoise", source, out, "--checkpoint", model_3d, "--sigma", "30"], capsys)
    assert code == 0, err
    result = nib.load(out).get_fdata()
    assert result.shape == hu.shape and np.isfinite(result).all()
    jumps = np.abs(np.diff(result, axis=0)).mean(axis=(1, 2))  # between plane x and x+1
    borders = [15, 23, 31]  # last plane of the windows starting at 0, 8, 16 (roi 16, overlap 0.5)
    inner = np.delete(jumps, borders)
    assert jumps[borders].max() < 1.5 * np.median(inner) + 1.0, (jumps[borders], np.median(inner))


# --- DICOM ----------------------------------------------------------------------------------------


def ct_series(folder: Path, seed: int = 0, shape=(20, 18, 4)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0)
    hu[3:-3, 3:-3, :] = 40.0 + rng.normal(0.0, 20.0, (shape[0] - 6, shape[1] - 6, shape[2]))
    hu = np.rint(hu)
    write_ct_series(folder, hu, seed=seed)
    return hu


def test_dicom_series_in_derived_series_out(tmp_path, capsys):
    hu = ct_series(tmp_path / "series")
    out = tmp_path / "denoised_series"
    # sigma 0: nothing changes, so every HU must come back exactly.
    code, _, err = run_cli(["denoise", tmp_path / "series", out, "--method", "tv", "--sigma", "0"], capsys)
    assert code == 0, err
    source, derived = read_dicom_series(tmp_path / "series")[0], read_dicom_series(out)[0]
    assert np.array_equal(derived.array, hu.astype(np.float32)) and np.allclose(derived.affine, source.affine)
    first = pydicom.dcmread(derived.files[0])
    original = pydicom.dcmread(source.files[0])
    assert (
        list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "medsynth denoise: tv" in first.DerivationDescription
    )
    assert first.SeriesInstanceUID != original.SeriesInstanceUID and first.StudyInstanceUID == original.StudyInstanceUID
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert (out / "medsynth_denoise.json").is_file()


def test_dicom_series_denoised_changes_values(tmp_path, capsys):
    hu = ct_series(tmp_path / "series", shape=(32, 32, 3))
    out = tmp_path / "dn"
    code, _, err = run_cli(["denoise", tmp_path / "series", out, "--method", "nlm"], capsys)
    assert code == 0, err
    derived = read_dicom_series(out)[0].array
    assert derived.std() < hu.std() and np.abs(derived[5:-5, 5:-5] - 40).mean() < np.abs(hu[5:-5, 5:-5] - 40).mean()


# --- bad inputs -----------------------------------------------------------------------------------


def _missing_pixels(folder: Path) -> None:
    files = write_ct_series(folder, np.zeros((8, 8, 3)))
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])


BAD_DICOM = {
    "mixed series": (
        lambda f: (write_ct_series(f, np.zeros((8, 8, 3)), seed=1), write_ct_series(f, np.zeros((8, 8, 2)), seed=2)),
        "2 DICOM series",
    ),
    "missing pixel data": (_missing_pixels, "pixel data"),
    "compressed": (lambda f: write_unsupported_compressed_slice(f), "JPEG 2000"),
    "rt struct alone": (lambda f: write_rt_struct(f), "non-image DICOM object"),
    "rt struct beside a series": (
        lambda f: (write_ct_series(f, np.zeros((8, 8, 3))), write_rt_struct(f)),
        "RT Structure Set",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DICOM))
def test_bad_dicom_folders(case, tmp_path, capsys):
    make, expected = BAD_DICOM[case]
    make(tmp_path / "in")
    out = tmp_path / "out" / "series"
    code, _, err = run_cli(["denoise", tmp_path / "in", out, "--method", "tv"], capsys)
    assert_clean_failure(code, err, out, expected)


def test_nifti_with_nan(tmp_path, capsys):
    data = np.ones((16, 16), np.float32)
    data[3, 4] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    out = tmp_path / "out.nii.gz"
    code, _, err = run_cli(["denoise", tmp_path / "nan.nii.gz", out, "--method", "tv", "--modality", "mr"], capsys)
    assert_clean_failure(code, err, out, "nan.nii.gz", "NaN")


@pytest.mark.parametrize("value", ["-1", "nan", "abc"])
def test_bad_sigma(value, tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "out.nii.gz"
    code, _, err = run_cli(["denoise", source, out, "--method", "tv", "--sigma", value], capsys)
    assert_clean_failure(code, err, out, "--sigma")


def test_checkpoint_that_is_not_a_medsynth_model(tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    (tmp_path / "garbage.pt").write_bytes(b"not a model at all")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    for name in ("garbage.pt", "other.pt"):
        out = tmp_path / "out.nii.gz"
        code, _, err = run_cli(["denoise", source, out, "--checkpoint", tmp_path / name], capsys)
        assert_clean_failure(code, err, out, name, "medsynth")


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "needs a model"),
        (["--mode", "tweedie", "--samples", "3", "--checkpoint", "x.pt"], "--mode ancestral"),
        (["--method", "median"], "invalid choice"),
        (["--model-uri", "models:/no-such-model@current"], "no-such-model"),
        (["--method", "bm3d", "--modality", "mr"], "bm3d"),
    ],
)
def test_bad_options(extra, expected, tmp_path, capsys, monkeypatch):
    import medsynth.denoise.classical as classical

    monkeypatch.setattr(
        classical,
        "_optional",
        lambda name: (_ for _ in ()).throw(
            classical.MedsynthError(f'{name} is not installed: pip install "medsynth[bm3d]"')
        ),
    )
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    out = tmp_path / "out.nii.gz"
    code, _, err = run_cli(["denoise", source, out, *extra], capsys)
    assert_clean_failure(code, err, out, expected)


def test_paths(tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    code, _, err = run_cli(["denoise", tmp_path / "missing.nii.gz", tmp_path / "o.nii.gz", "--method", "tv"], capsys)
    assert_clean_failure(code, err, tmp_path / "o.nii.gz", "not found")
    (tmp_path / "exists.nii.gz").write_bytes(b"keep me")
    code, _, err = run_cli(
        ["denoise", source, tmp_path / "exists.nii.gz", "--method", "tv", "--modality", "mr"], capsys
    )
    assert code == 2 and "already exists" in err and (tmp_path / "exists.nii.gz").read_bytes() == b"keep me"
    code, _, err = run_cli(["denoise", source, tmp_path / "o.png", "--method", "tv", "--modality", "mr"], capsys)
    assert_clean_failure(code, err, tmp_path / "o.png", "NIfTI output path")
    single = write_ct_series(tmp_path / "series", np.zeros((8, 8, 2)))[0]
    code, _, err = run_cli(["denoise", single, tmp_path / "o2", "--method", "tv"], capsys)
    assert_clean_failure(code, err, tmp_path / "o2", "single DICOM file")


def test_truncated_and_corrupt_nifti(tmp_path, capsys):
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    whole = source.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "corrupt.nii").write_bytes(b"\x00" * 400)
    for name in ("truncated.nii.gz", "corrupt.nii"):
        out = tmp_path / "out.nii.gz"
        code, _, err = run_cli(["denoise", tmp_path / name, out, "--method", "tv", "--modality", "mr"], capsys)
        assert_clean_failure(code, err, out, name)


def test_denoising_prior_trained_on_low_timesteps_only(tmp_path_factory, tmp_path, capsys):
    """diffusion.max_train_timestep: training draws only t < max, the model denoises noise levels within
    that range, refuses stronger noise, and cannot sample (config check and library check)."""
    from medsynth.config import DiffusionConfig
    from medsynth.diffusion.objectives import sample_timesteps
    from medsynth.diffusion.schedulers import build_train_scheduler
    from medsynth.errors import MedsynthError
    from medsynth.models.loading import load_trained_model
    from medsynth.synthesis import synthesise

    scheduler = build_train_scheduler(DiffusionConfig(num_train_timesteps=100), spatial_dims=2)
    drawn = sample_timesteps(
        scheduler, 4000, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), high=20
    )
    assert int(drawn.min()) == 0 and int(drawn.max()) == 19

    prior = _train(
        tmp_path_factory,
        deep_update(TINY, {"stages": ["prepare", "train", "denoise"], "diffusion": {"max_train_timestep": 50}}),
        "prior-low-t",
    )
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    code, _, err = run_cli(["denoise", source, tmp_path / "ok.nii.gz", "--checkpoint", prior, "--sigma", "20"], capsys)
    assert code == 0, err
    out = tmp_path / "too_noisy.nii.gz"
    code, _, err = run_cli(["denoise", source, out, "--checkpoint", prior, "--sigma", "5000"], capsys)
    assert_clean_failure(code, err, out, "beyond the timesteps", "below 50")
    with pytest.raises(MedsynthError, match="cannot sample from pure noise"):
        synthesise(
            load_trained_model(prior, torch.device("cpu")),
            sampler="ddim",
            steps=3,
            seeds=[0],
            batch_size=1,
            device=torch.device("cpu"),
        )
    with pytest.raises(ValueError, match="max_train_timestep"):
        DiffusionConfig(num_train_timesteps=100, max_train_timestep=101)


def test_class_conditional_model_denoises_as_its_unconditional_self_and_latent_models_are_refused(
    tmp_path_factory, tmp_path, capsys
):
    conditional = _train(
        tmp_path_factory,
        deep_update(TINY, {"model": {"num_classes": 2}, "data": {"phantom": {"count": 12}}}),
        "denoise-cfg",
    )
    source, _ = brain_nifti(tmp_path / "scan.nii.gz")
    code, _, err = run_cli(["denoise", source, tmp_path / "ok.nii.gz", "--checkpoint", conditional], capsys)
    assert code == 0, err
    assert np.isfinite(nib.load(tmp_path / "ok.nii.gz").get_fdata()).all()

    latent = _train(
        tmp_path_factory,
        deep_update(
            TINY,
            {
                "stages": ["prepare", "autoencoder", "train"],
                "diffusion": {"space": "latent"},
                "autoencoder": {
                    "channels": [8, 16],
                    "latent_channels": 2,
                    "norm_num_groups": 8,
                    "max_steps": 2,
                    "batch_size": 4,
                    "adv_weight": 0.0,
                },
            },
        ),
        "denoise-latent",
    )
    out = tmp_path / "latent.nii.gz"
    capsys.readouterr()  # the training's own output
    code, _, err = run_cli(["denoise", source, out, "--checkpoint", latent], capsys)
    assert_clean_failure(code, err, out, "latent diffusion model cannot denoise")
