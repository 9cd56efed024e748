"""ControlNet on a frozen diffusion model: zero-initialised residuals, training on label maps, exact
resume, sampling through ``generate(network_wrapper=...)`` (DDIM, Heun, guidance), label-map checks, 3D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trainers
from conftest import TINY, deep_update

from medsynth.config import Config, ControlNetConfig
from medsynth.diffusion.sampling import generate
from medsynth.diffusion.schedulers import build_sampling_scheduler
from medsynth.errors import MedsynthError
from medsynth.io.atomic import file_digest
from medsynth.io.state import load_state
from medsynth.models.controlnet import (
    CONTROLNET_FORMAT,
    TrainedControlNet,
    build_controlnet,
    check_label_maps,
    controlnet_kwargs,
    controlnet_wrapper,
    load_controlnet,
    one_hot_labels,
)
from medsynth.models.loading import TrainedModel, load_trained_model
from medsynth.runtime import DistContext
from medsynth.training.controlnet import CONTROLNET_CHECKPOINT_FORMAT, controlnet_validation_loss

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NUM_LABELS = 3
INTENSITY = np.array([-0.8, 0.0, 0.8], dtype=np.float32)  # the image is a function of the label map


def labelled(n: int, spatial: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label maps of two random boxes (labels 1, 2 on background 0); images: the label's intensity + small noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 1, *spatial), dtype=np.int64)
    for i in range(n):
        for value in (1, 2):
            lo = [int(rng.integers(0, s // 2)) for s in spatial]
            box = tuple(slice(a, a + int(rng.integers(s // 4, s // 2 + 1))) for a, s in zip(lo, spatial))
            labels[i, 0][box] = value
    images = INTENSITY[labels] + 0.02 * rng.standard_normal(labels.shape).astype(np.float32)
    return images.astype(np.float32), labels


def config_for(base: dict = TINY, **controlnet) -> Config:
    return Config.model_validate(
        deep_update(
            base,
            {
                "controlnet": {
                    "conditioning_channels": [8],
                    "batch_size": 4,
                    "max_steps": 6,
                    "lr": 1e-3,
                    "log_every": 1,
                    "checkpoint_every": 2,
                    **controlnet,
                }
            },
        )
    )


def train_base(
    directory: Path, images: np.ndarray, extra: dict | None = None, classes: np.ndarray | None = None
) -> TrainedModel:
    config = Config.model_validate(deep_update(TINY, {"train": {"max_steps": 4, "lr": 2e-3}, **(extra or {})}))
    kwargs = {} if classes is None else {"train_classes": classes[:-4], "val_classes": classes[-4:]}
    result = trainers.diffusion(config, images[:-4], images[-4:], directory, CPU, **kwargs)
    return load_trained_model(result.model_path)


def run(config: Config, base: TrainedModel, data: tuple[np.ndarray, np.ndarray], directory: Path, **kwargs):
    images, labels = data
    return trainers.controlnet(
        config,
        base,
        images[:-4],
        labels[:-4],
        images[-4:],
        labels[-4:],
        directory,
        CPU,
        num_labels=NUM_LABELS,
        base_sha256=file_digest(base.path),
        **kwargs,
    )


def in_memory(network, base: TrainedModel) -> TrainedControlNet:
    return TrainedControlNet(
        network.eval(), NUM_LABELS, base.spatial_dims, base.image_size, 0, Path("<memory>"), {}, ""
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: on a shared 2-core machine a second intra-op thread stalls every step
    (measured: the whole file 160 s with 2 threads under load, 19 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data2d() -> tuple[np.ndarray, np.ndarray]:
    return labelled(24, (16, 16))


@pytest.fixture(scope="module")
def base2d(tmp_path_factory: pytest.TempPathFactory, data2d) -> TrainedModel:
    return train_base(tmp_path_factory.mktemp("base"), data2d[0])


@pytest.fixture(scope="module")
def trained2d(tmp_path_factory: pytest.TempPathFactory, base2d, data2d):
    result = run(
        config_for(max_steps=60, lr=2e-2, checkpoint_every=60, log_every=10),
        base2d,
        data2d,
        tmp_path_factory.mktemp("controlnet"),
    )
    return result, load_controlnet(result.model_path)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def test_fresh_controlnet_is_the_base_encoder_and_leaves_the_output_unchanged(base2d: TrainedModel, data2d) -> None:
    network = build_controlnet(base2d, NUM_LABELS, ControlNetConfig(conditioning_channels=[8]))
    shared = set(network.state_dict()) & set(base2d.network.state_dict())
    assert "down_blocks.0.resnets.0.conv1.conv.weight" in shared and "time_embed.0.weight" in shared
    assert all(torch.equal(network.state_dict()[k], base2d.network.state_dict()[k]) for k in shared)

    x, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 30, 60, 99])
    wrapped = controlnet_wrapper(in_memory(network, base2d), data2d[1][:4])(base2d.network, slice(0, 4))
    with torch.no_grad():
        assert torch.equal(wrapped(x, timesteps=t), base2d.network(x, timesteps=t))


def test_conditioning_channels_must_stay_at_image_resolution(base2d: TrainedModel) -> None:
    with pytest.raises(MedsynthError, match=r"controlnet.conditioning_channels \[8, 16\].*expected exactly one entry"):
        controlnet_kwargs(base2d, NUM_LABELS, ControlNetConfig(conditioning_channels=[8, 16]))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_training_uses_the_label_maps_and_lowers_the_loss(trained2d, base2d: TrainedModel, data2d) -> None:
    """On data whose image is a function of its label map, the trained ControlNet lowers the base's loss,
    and lowers it less with the label maps of other images."""
    result, controlnet = trained2d
    images, labels = (torch.as_tensor(a[:16]) for a in data2d)
    fresh = build_controlnet(base2d, NUM_LABELS, ControlNetConfig(conditioning_channels=[8])).eval()
    loss = {
        name: controlnet_validation_loss(base2d, net, images, maps, num_labels=NUM_LABELS, seed=0)
        for name, net, maps in (
            ("fresh", fresh, labels),
            ("trained", controlnet.network, labels),
            ("wrong maps", controlnet.network, labels.roll(1, 0)),
        )
    }
    assert loss["trained"] < 0.97 * loss["fresh"], loss
    assert loss["trained"] < 0.95 * loss["wrong maps"], loss
    val_images, val_labels = (torch.as_tensor(a[-4:]) for a in data2d)
    val_loss = controlnet_validation_loss(
        base2d, controlnet.network, val_images, val_labels, num_labels=NUM_LABELS, seed=0
    )
    assert result.history[-1]["val/loss"] == pytest.approx(val_loss, rel=1e-5)
    assert {"train/loss", "train/lr", "train/images_per_s"} <= set(result.history[0])
    labels = labels[:4]

    x, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 40, 70, 90])
    with torch.no_grad():
        plain = base2d.network(x, timesteps=t)
        steered = controlnet_wrapper(controlnet, labels)(base2d.network, slice(0, 4))(x, timesteps=t)
        off = controlnet_wrapper(controlnet, labels, conditioning_scale=0.0)(base2d.network, slice(0, 4))(
            x, timesteps=t
        )
    assert not torch.allclose(steered, plain, atol=1e-3)
    assert torch.equal(off, plain)


def test_controlnet_file_holds_ema_weights_and_how_to_rebuild_them(trained2d, base2d: TrainedModel) -> None:
    result, controlnet = trained2d
    state = load_state(result.model_path, expected_format=CONTROLNET_FORMAT)
    assert (
        state["num_labels"] == NUM_LABELS
        and state["image_size"] == [16, 16]
        and state["spatial_dims"] == 2
        and state["step"] == 60
    )
    assert state["base_sha256"] == file_digest(base2d.path) == controlnet.base_sha256
    assert (
        state["kwargs"]["conditioning_embedding_num_channels"] == [8]
        and state["kwargs"]["conditioning_embedding_in_channels"] == NUM_LABELS
    )
    checkpoint = load_state(result.checkpoint_path, expected_format=CONTROLNET_CHECKPOINT_FORMAT)
    assert all(
        torch.equal(v, checkpoint["groups"]["controlnet"]["ema"]["shadow"][k]) for k, v in state["state_dict"].items()
    )
    assert not controlnet.network.training and not any(p.requires_grad for p in controlnet.network.parameters())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, base2d: TrainedModel, data2d) -> None:
    run(config_for(max_steps=1), base2d, data2d, tmp_path)
    with pytest.raises(MedsynthError, match=r"other values of controlnet\.lr"):
        run(config_for(max_steps=1, lr=5e-4, resume=True), base2d, data2d, tmp_path)


def test_divergence_is_one_line_naming_the_learning_rate(tmp_path: Path, base2d: TrainedModel, data2d) -> None:
    images, labels = data2d
    with pytest.raises(MedsynthError, match="diverged.*controlnet.lr"):
        run(config_for(max_steps=1), base2d, (np.full_like(images, np.nan), labels), tmp_path)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_generate_with_the_controlnet_wrapper(trained2d, base2d: TrainedModel, data2d, sampler: str) -> None:
    _, controlnet = trained2d
    scheduler = build_sampling_scheduler(base2d.diffusion, sampler=sampler, steps=3, spatial_dims=2)
    common = {
        "sampler": sampler,
        "image_shape": (1, 16, 16),
        "seeds": [0, 1, 2],
        "batch_size": 2,
        "device": torch.device("cpu"),
    }
    maps = data2d[1][:3]
    plain = generate(base2d.network, scheduler, **common)
    steered = generate(base2d.network, scheduler, network_wrapper=controlnet_wrapper(controlnet, maps), **common)
    off = generate(
        base2d.network,
        scheduler,
        network_wrapper=controlnet_wrapper(controlnet, maps, conditioning_scale=0.0),
        **common,
    )
    assert steered.shape == (3, 1, 16, 16) and torch.isfinite(steered).all()
    assert not torch.allclose(steered, plain, atol=1e-4)
    assert torch.equal(off, plain)


def test_class_conditional_base_under_guidance(tmp_path: Path, data2d) -> None:
    images, labels = data2d
    classes = np.arange(len(images)) % 2
    base = train_base(tmp_path / "base", images, {"model": {"num_classes": 2}}, classes)
    result = run(config_for(max_steps=2), base, data2d, tmp_path / "controlnet")
    controlnet = load_controlnet(result.model_path)
    assert controlnet.null_class == 2

    seen: list[int] = []

    def spy(model, batch):
        inner = controlnet_wrapper(controlnet, labels[:2])(model, batch)
        return lambda x, **kwargs: seen.append(len(x)) or inner(x, **kwargs)

    scheduler = build_sampling_scheduler(base.diffusion, sampler="ddim", steps=2, spatial_dims=2)
    common = {
        "sampler": "ddim",
        "image_shape": (1, 16, 16),
        "seeds": [0, 1],
        "batch_size": 2,
        "device": torch.device("cpu"),
        "class_labels": [0, 1],
        "guidance_scale": 2.0,
    }
    steered = generate(base.network, scheduler, network_wrapper=spy, **common)
    assert seen == [4, 4] and torch.isfinite(steered).all()
    off = generate(
        base.network,
        scheduler,
        network_wrapper=controlnet_wrapper(controlnet, labels[:2], conditioning_scale=0.0),
        **common,
    )
    assert torch.equal(off, generate(base.network, scheduler, **common))


# ---------------------------------------------------------------------------------------------
# Label maps and files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maps", "message"),
    [
        (np.zeros((2, 1, 16, 8), dtype=np.int64), r"shape \(2, 1, 16, 8\); expected \(N, 1, 16, 16\)"),
        (np.zeros((2, 2, 16, 16), dtype=np.int64), r"shape \(2, 2, 16, 16\)"),
        (np.zeros((2, 16, 16), dtype=np.int64), r"shape \(2, 16, 16\)"),
        (np.full((2, 1, 16, 16), 0.5, dtype=np.float32), "non-integer values"),
        (np.full((2, 1, 16, 16), 3, dtype=np.int64), r"label values \[3\] are outside 0..2"),
        (np.full((2, 1, 16, 16), -1, dtype=np.int64), r"label values \[-1\] are outside 0..2"),
    ],
)
def test_bad_label_maps_are_one_line_naming_the_source(maps: np.ndarray, message: str) -> None:
    with pytest.raises(MedsynthError, match=f"^labels.nii.gz: .*{message}") as info:
        check_label_maps(maps, [16, 16], NUM_LABELS, "labels.nii.gz")
    assert "\n" not in str(info.value)


def test_label_maps_stored_as_whole_floats_are_accepted_and_one_hot_encoded() -> None:
    maps = check_label_maps(np.array([[[[0.0, 2.0], [1.0, 1.0]]]]), [2, 2], NUM_LABELS, "x")
    assert maps.dtype == torch.int64
    encoded = one_hot_labels(maps, NUM_LABELS)
    assert encoded.shape == (1, 3, 2, 2) and encoded.dtype == torch.float32
    assert torch.equal(encoded.argmax(1, keepdim=True), maps) and torch.equal(encoded.sum(1), torch.ones(1, 2, 2))
    with pytest.raises(MedsynthError, match="outside 0..1"):
        one_hot_labels(maps, 2)


def test_load_controlnet_refuses_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(MedsynthError, match="file not found"):
        load_controlnet(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not torch")
    with pytest.raises(MedsynthError, match=f"{garbage}: not a readable medsynth controlnet file"):
        load_controlnet(garbage)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": CONTROLNET_FORMAT, "format_version": 1, "kwargs": {"in_channels": 1}}, wrong)
    with pytest.raises(MedsynthError, match=f"{wrong}: not a usable medsynth ControlNet"):
        load_controlnet(wrong)


# ---------------------------------------------------------------------------------------------
# 3D
# ---------------------------------------------------------------------------------------------


def test_3d_controlnet_trains_and_samples(tmp_path: Path) -> None:
    data = labelled(8, (8, 8, 8))
    base_config = deep_update(
        TINY,
        {
            "data": {"spatial_dims": 3, "image_size": [8, 8, 8], "phantom": {"shape": [16, 16, 16]}},
            "train": {"batch_size": 2, "val_images": 2},
        },
    )
    base = train_base(
        tmp_path / "base", data[0], {"data": base_config["data"], "train": {"max_steps": 2, "batch_size": 2}}
    )
    result = run(config_for(base_config, max_steps=2, batch_size=2), base, data, tmp_path / "controlnet")
    controlnet = load_controlnet(result.model_path)
    assert controlnet.spatial_dims == 3 and controlnet.image_size == [8, 8, 8]
    scheduler = build_sampling_scheduler(base.diffusion, sampler="ddim", steps=2, spatial_dims=3)
    samples = generate(
        base.network,
        scheduler,
        sampler="ddim",
        image_shape=(1, 8, 8, 8),
        seeds=[0, 1],
        batch_size=2,
        device=torch.device("cpu"),
        network_wrapper=controlnet_wrapper(controlnet, data[1][:2]),
    )
    assert samples.shape == (2, 1, 8, 8, 8) and torch.isfinite(samples).all()
