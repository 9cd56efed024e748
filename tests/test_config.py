"""Config schema: the shipped configs validate; every kind of bad config is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth.config import Config, check_paths, flatten, load_config, parse_overrides, to_plain
from medsynth.errors import MedsynthError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name: str) -> None:
    # the native-resolution recipes train on the user's folder: it is given on the command line
    text = (ROOT / "configs" / name).read_text()
    config = load_config(ROOT / "configs" / name, ["data.folder=."] if "source: folder" in text else [])
    assert isinstance(config, Config)
    assert len(config.data.image_size) == config.data.spatial_dims


def test_overrides_are_typed(write_config) -> None:
    config = load_config(
        write_config(),
        [
            "train.max_steps=7",
            "train.lr=2e-4",
            "train.channels_last=false",
            "data.image_size=[24, 24]",
            "data.phantom.shape=[24,24]",
        ],
    )
    assert config.train.max_steps == 7 and config.train.lr == 2e-4 and config.train.channels_last is False
    assert config.data.image_size == [24, 24]


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  max_stepz: 3\n", "train.max_stepz"),
        ("bogus: 1\n", "bogus"),
        ("train:\n  max_steps: many\n", "train.max_steps"),
        ("train:\n  lr: -1\n", "train.lr"),
        ("sample:\n  sampler: euler_a\n", "sample.sampler"),
        ("model:\n  channels: [8, 12]\n  attention_levels: [false, false]\n  norm_num_groups: 8\n", "model"),
        ("tracking:\n  model_alias: latest\n", "tracking.model_alias"),
        ("diffusion:\n  scheduler: rflow\n", "sample.sampler"),
        ("data:\n  spatial_dims: 3\n", "data"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MedsynthError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and key in message and "\n" not in message


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(MedsynthError, match=r"broken\.yaml: malformed YAML at line"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(MedsynthError, match="expected a mapping"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(MedsynthError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override", ["train.max_stepz=3", "nokey", "train..lr=1", "train.lr.x=1"])
def test_bad_overrides(write_config, override: str) -> None:
    with pytest.raises(MedsynthError):
        load_config(write_config(), [override])


def test_missing_data_folder_names_key(write_config, tmp_path: Path) -> None:
    path = write_config({"data": {"source": "folder", "folder": str(tmp_path / "missing"), "modality": "mr"}})
    config = load_config(path)
    with pytest.raises(MedsynthError, match=r"data\.folder.*folder not found"):
        check_paths(config, str(path))


def test_parse_overrides_values() -> None:
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=text", "e=true"]) == [
        (["a", "b"], 3),
        (["c"], [1, 2]),
        (["d"], "text"),
        (["e"], True),
    ]


def test_flatten_for_mlflow_params() -> None:
    flat = flatten(to_plain(Config()))
    assert flat["train.lr"] == 1e-3 and flat["data.phantom.kind"] == "brain_mri"
    assert all("." in k or k in {"name", "output_dir", "seed", "device", "stages"} for k in flat)
