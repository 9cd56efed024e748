"""The one training loop: exact resume for every trainer (parametrised), the resume identity from the
schema's result marks, the RNG restore, divergence, progress lines for log files."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import test_small_trainers as small
import torch
import trainers
from conftest import TINY, Interrupt, deep_update
from torch import nn

from medsynth.config import Config
from medsynth.data.patches import PatchSet
from medsynth.errors import MedsynthError
from medsynth.io.atomic import file_digest
from medsynth.io.state import load_state
from medsynth.models.loading import load_trained_model
from medsynth.training import engine
from medsynth.training.engine import Cadence, Optimised, Progress, RunSettings, Trainer, fit

CADENCE = {"max_steps": 6, "checkpoint_every": 2, "log_every": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets: a second intra-op thread only adds synchronisation on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int = 12, side: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, side, side)).astype(np.float32)


def label_maps(n: int = 12, side: int = 16) -> np.ndarray:
    maps = np.zeros((n, 1, side, side), dtype=np.int64)
    maps[:, :, 4:10, 4:10] = 1
    maps[:, :, 10:14, 2:6] = 2
    return maps


def diffusion_config(**train) -> Config:
    return Config.model_validate(deep_update(TINY, {"train": {**CADENCE, "val_every": 3, **train}}))


def autoencoder_config(**section) -> Config:
    ae = {
        "channels": [8, 16],
        "attention_levels": [False, False],
        "latent_channels": 2,
        "norm_num_groups": 8,
        "disc_channels": 8,
        "disc_layers": 1,
        "batch_size": 8,
        "lr": 1e-2,
        "adv_weight": 0.01,
        "adv_start": 3,
        "val_every": 3,
        "val_images": 2,
        **CADENCE,
        **section,
    }
    return Config.model_validate(deep_update(TINY, {"autoencoder": ae}))


def controlnet_config(**section) -> Config:
    cn = {"conditioning_channels": [8], "batch_size": 4, "lr": 1e-3, "val_images": 2, **CADENCE, **section}
    return Config.model_validate(deep_update(TINY, {"controlnet": cn}))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    config = diffusion_config(max_steps=2)
    result = trainers.diffusion(config, images(), images(4, seed=1), tmp_path_factory.mktemp("base"))
    return load_trained_model(result.model_path)


SMALL = {f"{kind}{'_3d' if dims == 3 else ''}": (kind, dims) for kind in small.KINDS for dims in (2, 3)}
FORMATS = {
    "diffusion": "medsynth-checkpoint",
    "diffusion_patches": "medsynth-checkpoint",
    "autoencoder": "medsynth-autoencoder-checkpoint",
    "autoencoder_patches": "medsynth-autoencoder-checkpoint",
    "controlnet": "medsynth-controlnet-checkpoint",
}


def run_small(name: str, work: Path, *, step_callback=None, resume: bool = False) -> SimpleNamespace:
    """A small evaluation trainer (feature network, classifier, segmenter) through ``fit`` with a work folder."""
    kind, dims = SMALL[name]
    run = RunSettings(seed=small.SEED, work_dir=work, progress=None, step_callback=step_callback)
    trainer = small.trainer_for(kind, dims, run)
    FORMATS[name] = trainer.checkpoint_format
    result = fit(trainer, replace(trainer.cadence, resume=resume), run)
    return SimpleNamespace(checkpoint_path=run.checkpoint_path, resumed_from=result.resumed_from, model_path=None)


def run_trainer(kind: str, work: Path, base, *, step_callback=None, **section):
    """Train one kind of model the way its stage (or, for the small ones, its function) does."""
    if kind in SMALL:
        return run_small(kind, work, step_callback=step_callback, resume=section.get("resume", False))
    if kind == "diffusion":
        return trainers.diffusion(
            diffusion_config(**section), images(), images(4, seed=1), work, step_callback=step_callback
        )
    if kind == "diffusion_patches":
        return trainers.diffusion(
            diffusion_config(**section), scan_patches(), images(4, seed=1), work, step_callback=step_callback
        )
    if kind.startswith("autoencoder"):
        if kind == "autoencoder_patches":
            section = {"patch_size": [8, 8], **section}
        return trainers.autoencoder(
            autoencoder_config(**section), images(), images(4, seed=1), work, step_callback=step_callback
        )
    return trainers.controlnet(
        controlnet_config(**section),
        base,
        images(),
        label_maps(),
        images(4, seed=1),
        label_maps(4),
        work,
        step_callback=step_callback,
        num_labels=3,
        base_sha256=file_digest(base.path),
    )


def assert_same_state(a, b, path: str = "") -> None:
    """Checkpoint states equal: tensors bitwise, everything else by value (throughput and RNG aside)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            if key not in ("rng", "images_per_s", "train/images_per_s"):
                assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def scan_patches() -> PatchSet:
    """Three 20x20x6 scans, planar 16x16 crops across all three axes, two per scan (crop draws resume too)."""
    rng = np.random.default_rng(3)
    volumes = [rng.uniform(-1, 1, (1, 20, 20, 16)).astype(np.float32) for _ in range(3)]
    masks = [v[0] > 0 for v in volumes]
    return PatchSet(volumes, masks, [16, 16], per_scan=2, foreground=0.7, axes=(0, 1, 2))


@pytest.mark.parametrize(
    "kind", ["diffusion", "diffusion_patches", "autoencoder", "autoencoder_patches", "controlnet", *SMALL]
)
@pytest.mark.parametrize("interrupt_at", [3, 4])
def test_every_trainer_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, base, kind: str, interrupt_at: int
) -> None:
    straight = run_trainer(kind, tmp_path / "a", base)
    with pytest.raises(KeyboardInterrupt):
        run_trainer(kind, tmp_path / "b", base, step_callback=Interrupt(interrupt_at))
    left = load_state(tmp_path / "b" / "checkpoints" / "last.pt", expected_format=FORMATS[kind])
    assert left["step"] == interrupt_at  # Ctrl-C between steps checkpoints the last completed one
    resumed = run_trainer(kind, tmp_path / "b", base, resume=True)
    assert resumed.resumed_from == interrupt_at
    a, b = (load_state(r.checkpoint_path, expected_format=FORMATS[kind]) for r in (straight, resumed))
    assert a["step"] == b["step"] > interrupt_at and a["groups"].keys() == b["groups"].keys()
    assert_same_state(a["groups"], b["groups"])  # networks, EMA, optimisers, LR schedules
    for x, y in zip(a["history"], b["history"]):
        assert {k: v for k, v in x.items() if "images_per_s" not in k} == {
            k: v for k, v in y.items() if "images_per_s" not in k
        }
    if kind not in SMALL:  # the small trainers write no model file: their network is the checkpoint's group
        file = {"diffusion": "model.pt", "diffusion_patches": "model.pt", "controlnet": "controlnet.pt"}.get(
            kind, "autoencoder.pt"
        )
        ma, mb = (torch.load(r.model_path.parent / file, weights_only=True)["state_dict"] for r in (straight, resumed))
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_a_knob_may_change_on_resume_a_result_key_is_refused_by_name(tmp_path: Path, base) -> None:
    straight = run_trainer("diffusion", tmp_path / "a", base, gradient_checkpointing=True)
    with pytest.raises(KeyboardInterrupt):
        run_trainer("diffusion", tmp_path / "b", base, step_callback=Interrupt(3))
    # a result key: one line naming it and the way out
    with pytest.raises(MedsynthError, match=r"other values of train\.lr\b.*--force") as refused:
        run_trainer("diffusion", tmp_path / "b", base, resume=True, lr=2e-3)
    assert "\n" not in str(refused.value)
    # knobs (memory, cadence): the run continues and ends with the weights of an uninterrupted run with them
    resumed = run_trainer(
        "diffusion", tmp_path / "b", base, resume=True, gradient_checkpointing=True, log_every=2, checkpoint_every=3
    )
    assert resumed.resumed_from == 3
    a, b = (torch.load(r.model_path, weights_only=True)["state_dict"] for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


class Noisy(Trainer):
    """A toy trainer whose step draws dropout masks from the *global* torch RNG: only a restored RNG state
    makes its resumed run equal an uninterrupted one."""

    checkpoint_format = "medsynth-test-checkpoint"

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.groups = [Optimised("net", self.net, lr=1e-2, total=8, lr_key="test.lr")]
        self.view, self.dataset_size = {"seed": seed}, 16
        self.x = torch.linspace(-1, 1, 64).reshape(16, 4)

    def step(self, step, index, shard, generator):
        x = self.x[torch.as_tensor(index)]
        return {"loss": (self.net(x) - x.sum(1, keepdim=True)).pow(2).mean()}


def fit_noisy(work: Path, *, resume: bool = False, step_callback=None) -> dict:
    fit(
        Noisy(0),
        Cadence(max_steps=8, batch_size=4, checkpoint_every=2, resume=resume),
        RunSettings(seed=0, work_dir=work, progress=None, step_callback=step_callback),
    )
    return load_state(work / "checkpoints" / "last.pt", expected_format=Noisy.checkpoint_format)


def test_resume_restores_the_global_rng_state(tmp_path: Path, monkeypatch) -> None:
    straight = fit_noisy(tmp_path / "a")
    for name, restore in (("b", True), ("c", False)):
        with pytest.raises(KeyboardInterrupt):
            fit_noisy(tmp_path / name, step_callback=Interrupt(4))
        torch.manual_seed(1234)  # whatever the process did in between
        if not restore:
            monkeypatch.setattr(engine, "set_rng_states", lambda states: None)
        resumed = fit_noisy(tmp_path / name, resume=True)
        same = all(
            torch.equal(v, resumed["groups"]["net"]["module"][k])
            for k, v in straight["groups"]["net"]["module"].items()
        )
        assert same is restore, f"restore={restore}"


def test_a_non_finite_loss_stops_the_run_naming_the_learning_rate(tmp_path: Path) -> None:
    class Diverging(Noisy):
        def step(self, step, index, shard, generator):
            loss = super().step(step, index, shard, generator)["loss"]
            return {"loss": loss * (float("inf") if step == 2 else 1.0)}

    with pytest.raises(MedsynthError, match=r"diverged at step 2 .*lower test\.lr"):
        fit(
            Diverging(0),
            Cadence(max_steps=8, batch_size=4, checkpoint_every=2),
            RunSettings(seed=0, work_dir=tmp_path, progress=None),
        )
    assert load_state(tmp_path / "checkpoints" / "last.pt", expected_format=Noisy.checkpoint_format)["step"] == 2


def test_progress_lines_for_a_log_file_at_least_every_interval() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress("train", 100, 0, stream=stream, interval=60.0, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] += 7.0  # one step every 7 s: a line at the first step, then every 9 steps (63 s), and the last
        progress.update(step, loss=0.5 if step % 10 == 0 else None, images_per_s=32.0 if step % 10 == 0 else None)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("train: step 1/100") and lines[-1].startswith("train: step 100/100")
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert all(b - a <= 9 for a, b in zip(steps, steps[1:])), steps  # 9 steps = 63 s: never more than a minute
    assert "loss 0.5" in lines[-1] and "32.0 images/s" in lines[-1] and "ETA 0m00s" in lines[-1]
    assert progress.bar is None  # not a terminal: no tqdm bar
