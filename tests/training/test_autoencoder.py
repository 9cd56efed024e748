"""The autoencoder stage: MONAI AutoencoderKL training (L1 + KL + patch GAN + perceptual), exact resume,
patch training, the model file, encode/decode and the latent scale factor, in 2D and 3D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trainers
from conftest import TINY, TINY_3D, deep_update
from monai.networks.nets import PatchDiscriminator, resnet10

from medsynth.config import Config
from medsynth.errors import MedsynthError
from medsynth.io.state import load_state
from medsynth.models.autoencoder import (
    AUTOENCODER_FORMAT,
    STATE_KEYS,
    PerceptualFeatures,
    autoencoder_from_state,
    autoencoder_state,
    build_autoencoder,
    compute_scale_factor,
    decode,
    encode,
    load_autoencoder,
    perceptual_loss,
)
from medsynth.runtime import DistContext
from medsynth.training.autoencoder import (
    AUTOENCODER_CHECKPOINT_FORMAT,
    discriminator_output_side,
    kl_divergence,
    reconstruct,
    reconstruction_metrics,
)

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_AE = {
    "channels": [8, 16],
    "attention_levels": [False, False],
    "latent_channels": 2,
    "norm_num_groups": 8,
    "disc_channels": 8,
    "disc_layers": 2,
    "batch_size": 8,
    "max_steps": 6,
    "lr": 1e-2,
    "adv_weight": 0.01,
    "adv_start": 3,
    "log_every": 1,
    "val_every": 3,
    "val_images": 4,
    "checkpoint_every": 2,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: a second intra-op thread only adds synchronisation, and on a shared 2-core
    machine an oversubscribed thread pool stalls every step (measured 2 s instead of 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ae_config(base: dict = TINY, **autoencoder) -> Config:
    return Config.model_validate(deep_update(base, {"autoencoder": {**TINY_AE, **autoencoder}}))


def blobs(n: int, side: int = 16, spatial_dims: int = 2, seed: int = 0) -> np.ndarray:
    """Ellipses (ellipsoids) of random position, size and intensity on a -1 background: easy to learn."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, side)] * spatial_dims, indexing="ij"))
    out = np.full((n, 1, *[side] * spatial_dims), -1.0, np.float32)
    for i in range(n):
        centre = rng.uniform(-0.4, 0.4, spatial_dims).reshape(-1, *[1] * spatial_dims)
        radius = rng.uniform(0.3, 0.7, spatial_dims).reshape(-1, *[1] * spatial_dims)
        out[i, 0][(((grid - centre) / radius) ** 2).sum(0) < 1] = rng.uniform(0, 1)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One 40-step 2D run shared by the tests of its outcome (about 2 s)."""
    images = blobs(40)
    config = ae_config(max_steps=40, adv_start=20, log_every=5, val_every=20, val_images=8)
    result = trainers.autoencoder(
        config, images[:32], images[32:], tmp_path_factory.mktemp("ae"), CPU, intensity={"modality": "mr"}
    )
    return config, images, result


# ---------------------------------------------------------------------------------------------
# Training outcome
# ---------------------------------------------------------------------------------------------


def test_training_improves_reconstruction(trained) -> None:
    config, images, result = trained
    torch.manual_seed(config.seed)
    untrained = build_autoencoder(config.autoencoder, spatial_dims=2)
    val = torch.as_tensor(images[32:])
    before = reconstruction_metrics(reconstruct(untrained, val, batch_size=8, device=torch.device("cpu")), val, 2)
    after = result.val_metrics
    # measured: PSNR 7.0 dB -> 15.6 dB, SSIM 0.18 -> 0.61, train L1 0.71 (steps 1-5) -> 0.21 (steps 36-40)
    assert after["val/psnr"] > before["val/psnr"] + 5.0
    assert after["val/ssim"] > before["val/ssim"] + 0.2
    l1 = [h["train/l1"] for h in result.history]
    assert l1[-1] < 0.5 * l1[0]
    assert result.history[-1]["val/psnr"] == pytest.approx(after["val/psnr"], abs=1e-4)


def test_adversarial_terms_start_at_adv_start(trained) -> None:
    _, _, result = trained
    by_step = {h["step"]: h for h in result.history}
    for step in (5, 10, 15, 20):  # windows of steps 1-20: before adv_start
        assert "train/gen_adv" not in by_step[step] and "train/disc" not in by_step[step]
    for step in (25, 30, 35, 40):
        assert np.isfinite(by_step[step]["train/gen_adv"]) and np.isfinite(by_step[step]["train/disc"])
    assert all("train/perceptual" not in h and "train/images_per_s" in h for h in result.history)


def test_no_discriminator_without_adversarial_weight(tmp_path: Path) -> None:
    images = blobs(10)
    result = trainers.autoencoder(
        ae_config(adv_weight=0.0, max_steps=4, adv_start=0), images[:8], images[8:], tmp_path, CPU
    )
    assert all("train/gen_adv" not in h for h in result.history)
    assert (
        "discriminator"
        not in load_state(result.checkpoint_path, expected_format=AUTOENCODER_CHECKPOINT_FORMAT)["groups"]
    )


def test_model_file_scale_factor_and_encoding(trained) -> None:
    config, images, result = trained
    state = load_state(result.model_path, expected_format=AUTOENCODER_FORMAT)
    assert (
        set(STATE_KEYS) <= set(state) and state["image_size"] == [16, 16] and state["intensity"] == {"modality": "mr"}
    )
    assert state["kwargs"]["channels"] == [8, 16] and state["step"] == 40
    ae = load_autoencoder(result.model_path)
    assert ae.downsample == 2 and ae.latent_channels == 2 and ae.scale_factor == pytest.approx(result.scale_factor)
    assert not ae.network.training and not any(p.requires_grad for p in ae.network.parameters())
    latents = encode(ae, images[:32], batch_size=5, device="cpu")
    assert latents.shape == (32, 2, 8, 8) and latents.dtype == np.float32
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-3)  # scaled to unit std on the training images
    assert np.array_equal(
        latents, encode(ae, torch.as_tensor(images[:32]), batch_size=5, device="cpu")
    )  # deterministic (posterior mean)
    assert np.allclose(
        latents, encode(ae, images[:32], batch_size=32, device="cpu"), atol=1e-5
    )  # batching changes float rounding only
    decoded = decode(ae, torch.as_tensor(latents[:4]), roi_size=None, device="cpu")
    assert decoded.shape == (4, 1, 16, 16)
    assert float((decoded - torch.as_tensor(images[:4])).abs().mean()) < 0.35  # measured 0.22 after 40 steps
    rebuilt = autoencoder_from_state(autoencoder_state(ae), "embedded")  # what a latent diffusion model file embeds
    assert np.array_equal(encode(rebuilt, images[:4], batch_size=4, device="cpu"), latents[:4])
    assert (result.model_path.parent / "reconstructions.png").stat().st_size > 0


def test_sliding_window_decode(trained) -> None:
    """Shapes and stitching at image resolution. A window that covers the latent reproduces the whole
    decode exactly; smaller windows are an approximation, because the decoder's GroupNorm statistics are
    those of the window, not of the whole image (measured on this model, 32^2 images, window 8^2 of 16^2
    latents, overlap 0.5: mean |difference| 0.22, about 0.05 when the whole image's statistics are frozen)."""
    _, _, result = trained
    ae = load_autoencoder(result.model_path)
    latents = torch.as_tensor(encode(ae, blobs(2, side=32, seed=1), batch_size=2, device="cpu"))
    whole = decode(ae, latents, roi_size=None)
    covering = decode(ae, latents, roi_size=[16, 16], overlap=0.5)
    assert covering.shape == whole.shape == (2, 1, 32, 32)
    assert torch.allclose(covering, whole, atol=1e-5)
    windowed = decode(ae, latents, roi_size=[8, 8], overlap=0.5, sw_batch_size=4)
    assert windowed.shape == (2, 1, 32, 32) and torch.isfinite(windowed).all()
    interior = (windowed - whole)[..., 4:-4, 4:-4].abs().mean()
    assert float(interior) < 0.35
    odd = decode(ae, latents[:, :, :12, :10], roi_size=[8, 8], overlap=0.25)
    assert odd.shape == (2, 1, 24, 20)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    images = blobs(10)
    trainers.autoencoder(ae_config(max_steps=2), images[:8], images[8:], tmp_path, CPU)
    other = ae_config(max_steps=2, channels=[8, 8], resume=True)
    with pytest.raises(MedsynthError, match=r"other values of autoencoder\.channels"):
        trainers.autoencoder(other, images[:8], images[8:], tmp_path, CPU)
    # cadence keys may change on resume
    trainers.autoencoder(
        ae_config(max_steps=2, resume=True, log_every=2, checkpoint_every=1), images[:8], images[8:], tmp_path, CPU
    )


# ---------------------------------------------------------------------------------------------
# Patches, 3D, input checks
# ---------------------------------------------------------------------------------------------


def test_patch_training_encodes_whole_images(tmp_path: Path) -> None:
    images = blobs(10)
    result = trainers.autoencoder(
        ae_config(patch_size=[8, 8], disc_layers=1, max_steps=4, adv_start=2), images[:8], images[8:], tmp_path, CPU
    )
    assert any("train/gen_adv" in h for h in result.history)
    ae = load_autoencoder(result.model_path)
    assert ae.image_size == [16, 16]
    assert encode(ae, images, batch_size=4, device="cpu").shape == (10, 2, 8, 8)


def test_too_deep_discriminator_for_the_patch_is_refused(tmp_path: Path) -> None:
    images = blobs(10)
    with pytest.raises(MedsynthError, match="disc_layers 2 is too deep"):
        trainers.autoencoder(ae_config(patch_size=[8, 8], disc_layers=2), images[:8], images[8:], tmp_path, CPU)


@pytest.mark.parametrize("side", [8, 12, 16, 32])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_discriminator_output_side_matches_monai(side: int, layers: int) -> None:
    """Where the prediction is < 1 MONAI's network cannot run on that input at all (the trainer refuses it)."""
    predicted = discriminator_output_side(side, layers)
    network = PatchDiscriminator(spatial_dims=2, num_layers_d=layers, channels=4, in_channels=1, out_channels=1).eval()
    if predicted >= 1:
        assert network(torch.zeros(1, 1, side, side))[-1].shape[-1] == predicted
    else:
        with pytest.raises(RuntimeError):
            network(torch.zeros(1, 1, side, side))


def test_3d_training_encode_decode(tmp_path: Path) -> None:
    images = blobs(4, side=16, spatial_dims=3)
    config = ae_config(TINY_3D, batch_size=2, max_steps=2, adv_start=1, val_images=1, disc_layers=1)
    result = trainers.autoencoder(config, images[:3], images[3:], tmp_path, CPU)
    assert "train/gen_adv" in result.history[-1] and np.isfinite(result.val_metrics["val/psnr"])
    ae = load_autoencoder(result.model_path)
    assert ae.spatial_dims == 3 and ae.image_size == [16, 16, 16]
    latents = encode(ae, images, batch_size=2, device="cpu")
    assert latents.shape == (4, 2, 8, 8, 8)
    assert decode(ae, torch.as_tensor(latents[:1]), roi_size=[4, 4, 4], overlap=0.5).shape == (1, 1, 16, 16, 16)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    images = blobs(10, side=18)  # 18 is not a multiple of the 3-level autoencoder's downsampling 4
    with pytest.raises(MedsynthError, match="not divisible"):
        trainers.autoencoder(
            ae_config(channels=[8, 8, 8], attention_levels=[False] * 3), images[:8], images[8:], tmp_path, CPU
        )
    with pytest.raises(MedsynthError, match="non-empty"):
        trainers.autoencoder(ae_config(), images[:8, 0], images[8:], tmp_path, CPU)


# ---------------------------------------------------------------------------------------------
# Scale factor, KL, model-file errors
# ---------------------------------------------------------------------------------------------


def test_scale_factor_and_kl() -> None:
    latents = np.random.default_rng(0).normal(0, 4.0, (8, 2, 8, 8))
    assert compute_scale_factor(latents) == pytest.approx(1 / latents.std(ddof=1))
    with pytest.raises(MedsynthError, match="std 0"):
        compute_scale_factor(np.ones((4, 2, 4, 4)))
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert float(kl_divergence(mu, sigma)) == 0.0
    assert float(kl_divergence(mu + 1, sigma)) == pytest.approx(0.5 * 3 * 16)  # 0.5 mu^2 per latent voxel


def test_load_autoencoder_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(MedsynthError, match="file not found"):
        load_autoencoder(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not torch")
    with pytest.raises(MedsynthError, match="garbage.pt"):
        load_autoencoder(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(MedsynthError, match="not a medsynth autoencoder"):
        load_autoencoder(plain)
    broken = tmp_path / "broken.pt"
    torch.save({"format": AUTOENCODER_FORMAT, "format_version": 1, "kwargs": {"channels": [8, 16]}}, broken)
    with pytest.raises(MedsynthError, match="broken.pt: not a usable medsynth autoencoder"):
        load_autoencoder(broken)


# ---------------------------------------------------------------------------------------------
# Perceptual loss
# ---------------------------------------------------------------------------------------------


def weights_file(path: Path, spatial_dims: int = 2) -> Path:
    """A MedicalNet-style file: a random MONAI resnet10 state dict, "module."-prefixed, inside {"state_dict": ...}."""
    network = resnet10(spatial_dims=spatial_dims, n_input_channels=1, feed_forward=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}}, path)
    return path


def test_perceptual_loss_trains_from_a_local_weights_file(tmp_path: Path) -> None:
    weights = weights_file(tmp_path / "resnet10.pth")
    images = blobs(10)
    config = ae_config(perceptual_weight=0.1, perceptual_weights=str(weights), max_steps=3, adv_start=10)
    result = trainers.autoencoder(config, images[:8], images[8:], tmp_path / "run", CPU)
    assert all(np.isfinite(h["train/perceptual"]) and h["train/perceptual"] > 0 for h in result.history)

    features = PerceptualFeatures(2, 10, weights)
    x = torch.as_tensor(images[:2]).requires_grad_(True)
    y = torch.as_tensor(images[2:4])
    assert float(perceptual_loss(features, y, y)) == pytest.approx(0.0, abs=1e-6)
    loss = perceptual_loss(features, x, y)
    loss.backward()
    assert float(loss.detach()) > 0 and x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad or p.grad is not None for p in features.parameters())
    assert not features.train().training  # stays in eval mode


def test_perceptual_weights_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MedsynthError, match="missing.pth: perceptual weights file not found"):
        PerceptualFeatures(2, 10, tmp_path / "missing.pth")
    wrong = tmp_path / "wrong_keys.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong)
    with pytest.raises(MedsynthError, match=r"wrong_keys.pth: \d+ of \d+ weights of the perceptual ResNet are missing"):
        PerceptualFeatures(2, 10, wrong)
    other_dims = weights_file(tmp_path / "resnet10_3d.pth", spatial_dims=3)
    with pytest.raises(MedsynthError, match="resnet10_3d.pth: weights do not fit"):
        PerceptualFeatures(2, 10, other_dims)
    not_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    with pytest.raises(MedsynthError, match="tensor.pth: not a state dict"):
        PerceptualFeatures(2, 10, not_dict)
    images = blobs(10)
    config = ae_config(perceptual_weight=0.1, perceptual_weights=str(tmp_path / "missing.pth"), max_steps=1)
    with pytest.raises(MedsynthError, match="missing.pth"):
        trainers.autoencoder(config, images[:8], images[8:], tmp_path / "run", CPU)
