"""Sharded stages under ``torchrun`` (gloo on CPU): sample, denoise and augment split their work across
the ranks, rank 0 gathers and alone writes, and the outputs are those of one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.runtime import DistContext, map_sharded, shard

ROOT = Path(__file__).resolve().parents[2]
ONE_PROCESS = DistContext(0, 1, 0, torch.device("cpu"))


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


# --- the split / gather helper --------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shards_cover_every_item_exactly_once(world_size: int) -> None:
    for count in range(20):
        shares = [shard(count, rank, world_size) for rank in range(world_size)]
        assert sorted(i for share in shares for i in share) == list(range(count))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(i % world_size == rank for rank, share in enumerate(shares) for i in share)


def test_shard_refuses_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        shard(5, 2, 2)


def test_map_sharded_in_one_process_is_plain_batches() -> None:
    calls: list[list[int]] = []

    def square(part: list[int]) -> list[int]:
        calls.append(part)
        return [i * i for i in part]

    rounds = list(map_sharded(square, 5, ONE_PROCESS, chunk=2))
    assert calls == [[0, 1], [2, 3], [4]]
    assert rounds == [[(0, 0), (1, 1)], [(2, 4), (3, 9)], [(4, 16)]]
    assert list(map_sharded(square, 0, ONE_PROCESS)) == []


def test_map_sharded_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        list(map_sharded(lambda part: part, 3, ONE_PROCESS, chunk=0))
    with pytest.raises(ValueError, match="2 results for 1 items"):
        list(map_sharded(lambda part: [0, 0], 3, ONE_PROCESS))


GATHER_SCRIPT = """
import json
from medsynth.runtime import map_sharded, setup, teardown

ctx = setup("cpu")
computed = []

def compute(part):
    computed.extend(part)
    return [{"square": i * i, "rank": ctx.rank, "payload": [i] * 1000} for i in part]

rounds = [
    [(i, r["square"], r["rank"], len(r["payload"])) for i, r in pairs]
    for pairs in map_sharded(compute, COUNT, ctx, chunk=2)
]
# one file per rank: two processes printing to one pipe can interleave their lines
with open(f"OUTDIR/rank{ctx.rank}.json", "w") as out:
    json.dump({"rank": ctx.rank, "computed": computed, "rounds": rounds}, out)
teardown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 1])
def test_map_sharded_gathers_every_round_on_rank_0(tmp_path: Path, count: int) -> None:
    script = tmp_path / "gather.py"
    script.write_text(textwrap.dedent(GATHER_SCRIPT.replace("COUNT", str(count)).replace("OUTDIR", str(tmp_path))))
    done = torchrun(str(script), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert results[0]["computed"] == shard(count, 0, 2) and results[1]["computed"] == shard(count, 1, 2)
    # rank 0 gets each round's items in order (round r: items 4r..4r+3), each from the rank that owns it;
    # rank 1 runs the same number of rounds and gets nothing
    expected = [[(i, i * i, i % 2, 1000) for i in range(r * 4, min(count, r * 4 + 4))] for r in range((count + 3) // 4)]
    assert [[tuple(item) for item in round_] for round_ in results[0]["rounds"]] == expected
    assert results[1]["rounds"] == [[] for _ in expected]


# --- the stages through the real CLI --------------------------------------------------------------


def _own_scans(folder: Path) -> Path:
    """A datalist of three noisy MR scans of your own (one larger than the model: sliding windows)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for k, shape in enumerate([(16, 16), (20, 16), (16, 16)]):
        clean = np.pad(np.full((shape[0] - 4, shape[1] - 4), 100.0 + 20 * k), 2)
        scan = np.abs(clean + rng.normal(0, 5, shape) + 1j * rng.normal(0, 5, shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(scan, np.diag([13.75, 13.75, 1.0, 1.0])), folder / f"scan_{k}.nii.gz")
        entries.append({"image": f"scan_{k}.nii.gz"})
    (folder / "list.json").write_text(json.dumps({"testing": entries}))
    return folder / "list.json"


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


@pytest.mark.slow
def test_torchrun_sharded_stages_match_one_process(write_config, tmp_path: Path, capsys) -> None:
    experiment = "medsynth-tests-sharded"
    extra = {
        "stages": ["prepare", "train", "sample", "denoise", "augment"],
        "tracking": {"experiment": experiment, "log_model": False},
        "train": {"max_steps": 2},
        # 5 samples over 2 ranks, 2 per batch: rank 0 draws 0, 2, 4 in two rounds, rank 1 draws 1, 3
        "sample": {"num_samples": 5, "batch_size": 2},
        # 2 levels x 3 held-out cases = 6 items, and 3 scans of your own
        "data": {"phantom": {"count": 15}},
        "denoise": {
            "methods": ["diffusion", "tv"],
            "num_images": 3,
            "levels": [0.05, 0.1],
            "datalist": str(_own_scans(tmp_path / "own")),
        },
        "augment": {"num_samples": 3, "audit": {"features": False}},
    }
    one = write_config(extra | {"output_dir": str(tmp_path / "one")}, name="one.yaml")
    two = write_config(extra | {"output_dir": str(tmp_path / "two")}, name="two.yaml")
    assert main(["run", str(one)]) == 0, capsys.readouterr().err
    # The same prepared data and trained model for the torchrun run: only the sharded stages run there.
    for stage in ("prepare", "train"):
        shutil.copytree(tmp_path / "one" / stage, tmp_path / "two" / stage)
    runs_before = len(mlflow.search_runs(experiment_names=[experiment], output_format="list"))

    done = torchrun("-m", "medsynth", "run", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("prepare", "train"):
        assert done.stdout.count(f"{stage}: unchanged, skipped") == 1
    for stage in ("sample", "denoise", "augment"):
        assert done.stdout.count(f"{stage}: done") == 1, done.stdout  # rank 0 alone reports
    assert done.stdout.count("denoise: datalist scan") == 3 and done.stdout.count("denoise: level") == 6
    # Ranks > 0 log nothing: one parent run and one run per stage that ran.
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) - runs_before == 4

    one_out, two_out = tmp_path / "one", tmp_path / "two"
    # Nothing else in the output folder: no leftovers from any rank.
    assert sorted(p.name for p in two_out.iterdir()) == sorted(p.name for p in one_out.iterdir())
    for stage in ("sample", "denoise", "augment"):
        files = _files(two_out / stage)
        assert files == _files(one_out / stage), stage  # same names: none duplicated, none missing
        manifest = json.loads((two_out / stage / "manifest.json").read_text())
        assert set(manifest["outputs"]) | {"manifest.json"} == files
        for name in (f for f in files if f.endswith(".nii.gz")):
            a, b = _nifti(one_out / stage / name), _nifti(two_out / stage / name)
            assert a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-3), (stage, name, np.abs(a - b).max())

    # sample: 5 images in seed order, the same record
    samples = np.load(two_out / "sample" / "samples.npy")
    assert samples.shape == (5, 1, 16, 16) and np.allclose(
        samples, np.load(one_out / "sample" / "samples.npy"), atol=1e-5
    )
    assert len({samples[i].tobytes() for i in range(5)}) == 5
    record_one, record_two = (json.loads((o / "sample" / "samples.json").read_text()) for o in (one_out, two_out))
    assert record_two["seeds"] == [1000 + i for i in range(5)]
    assert _without(record_one, "seconds", "model_file") == _without(record_two, "seconds", "model_file")

    # denoise: every (level, case) entry and every scan of the datalist once, in order, with their sidecars
    den_one, den_two = (json.loads((o / "denoise" / "denoise.json").read_text()) for o in (one_out, two_out))
    assert [(e["level_index"], e["case_id"]) for e in den_two["entries"]] == [
        (e["level_index"], e["case_id"]) for e in den_one["entries"]
    ]
    assert len(den_two["entries"]) == 6 and [s["name"] for s in den_two["scans"]] == ["scan_0", "scan_1", "scan_2"]
    for e1, e2 in zip(den_one["entries"], den_two["entries"]):
        assert e1["true_sigma"] == pytest.approx(e2["true_sigma"])
        for method in ("diffusion", "tv"):
            assert e1["methods"][method]["file"] == e2["methods"][method]["file"]
            assert e1["methods"][method]["sigma"] == pytest.approx(e2["methods"][method]["sigma"], rel=1e-5)
    assert den_one["scans"] == den_two["scans"]
    for scan in den_two["scans"]:
        for method, written in scan["outputs"].items():
            sidecar = (two_out / "denoise" / written["output"]).with_name(f"{method}.json")
            provenance = json.loads(sidecar.read_text())
            assert provenance["output"] == str(
                two_out / "denoise" / written["output"]
            )  # the final path, not a work folder
            other = json.loads((one_out / "denoise" / written["output"]).with_name(f"{method}.json").read_text())
            assert _without(provenance, "output", "checkpoint", "denoise") == _without(
                other, "output", "checkpoint", "denoise"
            )
            assert _without(provenance["denoise"], "model_file") == _without(other["denoise"], "model_file")

    # augment: the audit on rank 0 saw all 3 cases; same datalist, same provenance up to run-specific fields
    aug_one, aug_two = (o / "augment" for o in (one_out, two_out))
    assert np.allclose(np.load(aug_one / "synthetic_images.npy"), np.load(aug_two / "synthetic_images.npy"), atol=1e-5)
    assert json.loads((aug_one / "datalist_augmented.json").read_text()) == json.loads(
        (aug_two / "datalist_augmented.json").read_text()
    )
    assert len(json.loads((aug_two / "audit.json").read_text())["per_scan"]) == 3
    for i in range(3):
        p1, p2 = (json.loads((a / "synthetic" / f"synthetic_{i:04d}.json").read_text()) for a in (aug_one, aug_two))
        assert p2["seed"] == 100000 + i and p2["index"] == i
        varying = ("model_file", "augment_run_id", "config_digest", "memorisation_audit")
        assert _without(p1, *varying) == _without(p2, *varying)
        assert p1["memorisation_audit"]["image"] == pytest.approx(p2["memorisation_audit"]["image"], rel=1e-3)
