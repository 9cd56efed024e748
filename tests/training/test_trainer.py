"""Training: exact resume after an interruption, safe checkpoints, schedules, data order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trainers
from conftest import TINY, deep_update

from medsynth.config import Config
from medsynth.errors import MedsynthError
from medsynth.io.state import CHECKPOINT_FORMAT, MODEL_FORMAT, load_state
from medsynth.runtime import DistContext
from medsynth.training.engine import batch_indices, lr_factor

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_config(**train) -> Config:
    return Config.model_validate(
        deep_update(TINY, {"train": {"max_steps": 6, "checkpoint_every": 2, "log_every": 1, "val_every": 3, **train}})
    )


def data(spatial=(16, 16), n=12) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, 1, *spatial)).astype(np.float32)


def test_same_seed_same_weights_different_seed_differs(tmp_path: Path) -> None:
    images = data()
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = tiny_config(max_steps=2)
        config.seed = seed
        result = trainers.diffusion(config, images[:10], images[10:], tmp_path / name, CPU)
        runs.append(load_state(result.model_path, expected_format=MODEL_FORMAT)["state_dict"])
    key = next(iter(runs[0]))
    assert torch.equal(runs[0][key], runs[1][key]) and not torch.equal(runs[0][key], runs[2][key])


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    images = data()
    trainers.diffusion(tiny_config(max_steps=2), images[:10], images[10:], tmp_path, CPU)
    other = Config.model_validate(deep_update(TINY, {"model": {"channels": [8, 16]}, "train": {"resume": True}}))
    with pytest.raises(MedsynthError, match=r"other values of model\.channels"):
        trainers.diffusion(other, images[:10], images[10:], tmp_path, CPU)


def test_3d_training_step_and_model_file(tmp_path: Path) -> None:
    config = Config.model_validate(
        deep_update(
            TINY,
            {
                "data": {"spatial_dims": 3, "image_size": [16, 16, 16], "phantom": {"shape": [16, 16, 16]}},
                "train": {"max_steps": 1, "batch_size": 2, "val_images": 2},
            },
        )
    )
    images = data((16, 16, 16), 4)
    result = trainers.diffusion(config, images[:3], images[3:], tmp_path, CPU)
    state = load_state(result.model_path, expected_format=MODEL_FORMAT)
    assert state["spatial_dims"] == 3 and state["image_size"] == [16, 16, 16]


def test_checkpoints_are_loaded_without_unpickling_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Path("/etc/passwd")}, evil)  # needs a pickled class
    with pytest.raises(MedsynthError, match="not a readable"):
        load_state(evil, expected_format=CHECKPOINT_FORMAT)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(MedsynthError, match="not a medsynth"):
        load_state(other, expected_format=CHECKPOINT_FORMAT)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not torch")
    with pytest.raises(MedsynthError):
        load_state(garbage, expected_format=MODEL_FORMAT)


def test_lr_warmup_then_cosine_to_floor() -> None:
    factors = [lr_factor(s, warmup=10, total=100, floor=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, warmup=10, total=100, floor=0.1) == pytest.approx(0.1)


def test_data_order_is_a_seeded_stream_of_permutations() -> None:
    first_epoch = np.concatenate([batch_indices(s, 4, 12, seed=3) for s in range(3)])
    assert sorted(first_epoch) == list(range(12))
    assert np.array_equal(batch_indices(5, 4, 12, seed=3), batch_indices(5, 4, 12, seed=3))
    assert not np.array_equal(batch_indices(0, 12, 12, seed=3), batch_indices(0, 12, 12, seed=4))
    assert len(batch_indices(0, 20, 12, seed=0)) == 20  # batches larger than the data wrap around epochs


@pytest.mark.parametrize("attention", [False, True])
def test_gradient_checkpointing_gives_identical_weights(tmp_path: Path, attention: bool) -> None:
    """train.gradient_checkpointing recomputes activations; the trained weights are bit-identical (CPU),
    which is why the flag is not part of the train stage's cache key. With attention, MONAI's flash
    attention flag goes through to the network and back from the model file."""
    from medsynth.models.loading import load_trained_model
    from medsynth.models.unet import build_unet, enable_gradient_checkpointing

    images = data()
    states = []
    for name, flag in (("plain", False), ("checkpointed", True)):
        config = tiny_config(max_steps=3, gradient_checkpointing=flag)
        if attention:
            config = Config.model_validate(
                deep_update(
                    config.model_dump(), {"model": {"attention_levels": [False, True], "use_flash_attention": True}}
                )
            )
        result = trainers.diffusion(config, images[:10], images[10:], tmp_path / name, CPU)
        states.append(load_state(result.model_path, expected_format=MODEL_FORMAT)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    if attention:
        assert load_state(result.model_path, expected_format=MODEL_FORMAT)["unet"]["use_flash_attention"] is True
        rebuilt = load_trained_model(result.model_path).network
        flags = [m.use_flash_attention for m in rebuilt.modules() if hasattr(m, "use_flash_attention")]
        assert flags and all(flags)
    network = build_unet(tiny_config().model, spatial_dims=2)
    assert enable_gradient_checkpointing(network) >= 4
