"""Self-supervised denoising: the Noisier2Noise estimate of a noisy-data prior (maths), and
``medsynth denoise --self-supervised`` through the CLI (fit on the scan itself or a train folder, reuse of the
fitted prior, and the bad inputs: a clean prior, another modality, a scan smaller than the patch, no noise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, deep_update
from dicom_factory import write_ct_series
from test_denoise_cli import assert_clean_failure, brain_nifti, model_2d, run_cli  # noqa: F401 (fixture)

from medsynth.config import load_config
from medsynth.denoise.prior import noisy_prior_denoise
from medsynth.diffusion.schedulers import build_train_scheduler
from medsynth.io.volumes import read_nifti

# A tiny recipe: 16x16 crops, a few steps (the shipped one is configs/denoise_self_supervised.yaml).
RECIPE = deep_update(
    TINY,
    {
        "data": {"source": "folder", "modality": "mr", "image_size": [16, 16], "patches": {"per_scan": 2}},
        "diffusion": {"num_train_timesteps": 100, "max_train_timestep": 60},
        "train": {"max_steps": 6, "batch_size": 4, "checkpoint_every": 3},
        "stages": ["prepare", "denoise", "evaluate"],
        "denoise": {"methods": ["self_supervised"], "draws": 2},
    },
)


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_the_shipped_recipes_load() -> None:
    for name in ("denoise_self_supervised", "denoise_mri_native", "denoise_ct_native"):
        config = load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml", ["data.folder=."])
        assert config.data.patches is not None and config.diffusion.space == "pixel"


class GaussianData(torch.nn.Module):
    """The exact noisy-data denoiser for x ~ N(0, a^2), y = x + sigma n: E[y | z] = z (a^2 + sigma^2) /
    (a^2 + sigma^2 + s^2), written as an epsilon-predicting network of a DDPM schedule."""

    def __init__(self, scheduler, a: float, sigma: float) -> None:
        super().__init__()
        self.abar, self.a, self.sigma = scheduler.alphas_cumprod.double(), a, sigma

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **_) -> torch.Tensor:
        abar = self.abar[timesteps].view(-1, *[1] * (x.ndim - 1))
        s2 = (1 - abar) / abar
        z = x.double() / abar.sqrt()
        d = z * (self.a**2 + self.sigma**2) / (self.a**2 + self.sigma**2 + s2)
        return ((z - d) / s2.sqrt()).float()  # epsilon = (z - E[y | z]) / s in the VE view


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_noisier2noise_of_the_exact_noisy_data_denoiser_is_the_posterior_mean_given_the_noisier_scan(
    alpha: float,
) -> None:
    config = load_config(Path(__file__).parents[2] / "configs" / "denoise_self_supervised.yaml", ["data.folder=."])
    diffusion = config.diffusion.model_copy(update={"prediction_type": "epsilon", "max_train_timestep": None})
    scheduler = build_train_scheduler(diffusion, spatial_dims=2)
    a, sigma = 0.3, 0.1
    y = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * float(np.hypot(a, sigma))
    out = noisy_prior_denoise(
        GaussianData(scheduler, a, sigma), scheduler, y, sigma, roi_size=[16, 16], alpha=alpha, draws=400
    )
    # each draw is E[x | z] with z = y + alpha sigma n' = x + sigma sqrt(1 + alpha^2) n'': for Gaussian x that is
    # z a^2 / (a^2 + sigma^2 (1 + alpha^2)), whose average over n' is y times the same factor (a little more
    # shrinkage than E[x | y] = y a^2 / (a^2 + sigma^2): the price of never seeing a clean image)
    used = out.match.matched_sigma / sigma  # alpha snapped to the nearest trained level
    assert abs(used - alpha) < 0.05 * alpha
    expected = y * a**2 / (a**2 + sigma**2 * (1 + used**2))
    error = float((out.mean - expected).abs().mean()) / float(y.abs().mean())
    assert error < 1e-4  # antithetic pairs: for this linear denoiser the added noise cancels exactly
    assert out.std is None
    # an odd number of draws leaves one unpaired draw: its noise shows
    single = noisy_prior_denoise(
        GaussianData(scheduler, a, sigma), scheduler, y, sigma, roi_size=[16, 16], alpha=alpha, draws=3
    )
    assert float((single.mean - expected).abs().mean()) / float(y.abs().mean()) > 0.01
    paired = noisy_prior_denoise(
        GaussianData(scheduler, a, sigma), scheduler, y, sigma, roi_size=[16, 16], alpha=alpha, draws=2
    )
    torch.testing.assert_close(paired.mean, expected.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_self_supervised_fits_on_the_scan_writes_the_prior_and_reuses_it(tmp_path: Path, recipe: Path, capsys) -> None:
    noisy, clean = brain_nifti(tmp_path / "in" / "noisy.nii.gz", shape=(24, 24), noise=0.08)
    out = tmp_path / "out" / "denoised.nii.gz"
    code, stdout, err = run_cli(
        ["denoise", noisy, out, "--self-supervised", "--config", recipe, "--modality", "mr"], capsys
    )
    assert code == 0, err
    assert "self-supervised (prior fitted on the input)" in stdout
    image = read_nifti(out).array
    assert image.shape == clean.shape and np.isfinite(image).all()
    record = json.loads((tmp_path / "out" / "denoised.json").read_text())["denoise"]
    assert record["method"] == "self_supervised" and record["prior_fitted_on"] == "input"
    prior = tmp_path / "out" / "denoised_prior.pt"
    assert prior.is_file() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    again = tmp_path / "out" / "again.nii.gz"
    code, stdout, err = run_cli(["denoise", noisy, again, "--self-supervised", "--checkpoint", prior], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(read_nifti(again).array, image)  # same prior, same seed: same result
    mirrored = tmp_path / "out" / "mirrored.nii.gz"
    code, _, err = run_cli(
        ["denoise", noisy, mirrored, "--self-supervised", "--checkpoint", prior, "--ensemble"], capsys
    )
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "mirrored.json").read_text())["denoise"]
    assert record["ensemble"] == 4 and record["network_evaluations"] == record["draws"] * 4  # x 4 mirror images
    assert not np.allclose(read_nifti(mirrored).array, image)
    # a noisy-data prior in the clean path would hand back the noise: refused
    bad = tmp_path / "out" / "bad.nii.gz"
    code, _, err = run_cli(["denoise", noisy, bad, "--checkpoint", prior, "--modality", "mr"], capsys)
    assert_clean_failure(code, err, bad, "a prior fitted on noisy scans; use it with --self-supervised")


def test_self_supervised_with_a_clean_prior_is_refused(tmp_path: Path, model_2d: Path, capsys) -> None:  # noqa: F811
    noisy, _ = brain_nifti(tmp_path / "noisy.nii.gz", shape=(24, 24), noise=0.08)
    out = tmp_path / "out" / "denoised.nii.gz"
    code, _, err = run_cli(["denoise", noisy, out, "--self-supervised", "--checkpoint", model_2d], capsys)
    assert_clean_failure(
        code, err, out, "a prior trained on clean scans; --self-supervised needs a prior fitted on noisy"
    )


def test_a_train_folder_of_another_modality_is_refused(tmp_path: Path, recipe: Path, capsys) -> None:
    noisy, _ = brain_nifti(tmp_path / "noisy.nii.gz", shape=(24, 24), noise=0.08)
    folder = tmp_path / "train"
    write_ct_series(folder / "series", np.full((24, 24, 3), 40.0, dtype=np.float32))
    out = tmp_path / "out" / "denoised.nii.gz"
    code, _, err = run_cli(
        ["denoise", noisy, out, "--self-supervised", "--train-folder", folder, "--config", recipe, "--modality", "mr"],
        capsys,
    )
    assert_clean_failure(code, err, out, "--train-folder: scan 0 is CT but the scan to denoise is MR")


def test_a_scan_smaller_than_the_patch_is_refused(tmp_path: Path, recipe: Path, capsys) -> None:
    noisy, _ = brain_nifti(tmp_path / "noisy.nii.gz", shape=(24, 24), noise=0.08)
    config = deep_update(RECIPE, {"data": {"image_size": [32, 32]}})
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(config))
    out = tmp_path / "out" / "denoised.nii.gz"
    code, _, err = run_cli(["denoise", noisy, out, "--self-supervised", "--config", big, "--modality", "mr"], capsys)
    assert_clean_failure(code, err, out, "is smaller than the 32x32 patch")


def test_a_scan_without_noise_is_refused(tmp_path: Path, recipe: Path, capsys) -> None:
    clean, _ = brain_nifti(tmp_path / "clean.nii.gz", shape=(24, 24), noise=0.0)
    out = tmp_path / "out" / "denoised.nii.gz"
    code, _, err = run_cli(
        ["denoise", clean, out, "--self-supervised", "--config", recipe, "--modality", "mr", "--sigma", "0"], capsys
    )
    assert_clean_failure(code, err, out, "is too low to denoise self-supervised")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--method", "nlm"], "--self-supervised fits its own prior; it does not go with --method nlm"),
        (["--alpha", "0"], "--alpha must be in (0, 4]"),
        (["--config", "missing.yaml"], "no such recipe file"),
    ],
)
def test_bad_self_supervised_options(tmp_path: Path, extra: list[str], expected: str, capsys) -> None:
    noisy, _ = brain_nifti(tmp_path / "noisy.nii.gz", shape=(24, 24), noise=0.08)
    out = tmp_path / "out" / "denoised.nii.gz"
    code, _, err = run_cli(["denoise", noisy, out, "--self-supervised", "--modality", "mr", *extra], capsys)
    assert_clean_failure(code, err, out, expected)
