"""The benchmark scripts run end to end on a tiny trained run (their numbers go to docs/benchmarks.md;
here only that they work and write what they say)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medsynth.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    import yaml
    from conftest import TINY, deep_update

    folder = tmp_path_factory.mktemp("bench")
    config = deep_update(
        TINY,
        {
            "output_dir": str(folder / "out"),
            "stages": ["prepare", "train", "denoise"],
            "data": {"phantom": {"noise": 0.0}},
            "tracking": {"registered_model": "medsynth-tests-bench"},
        },
    )
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--stages", "prepare,train"]) == 0
    return folder / "out"


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_sampler_comparison_script(tiny_run: Path, tmp_path: Path) -> None:
    done = script(
        "samplers.py",
        "--run",
        str(tiny_run),
        "--reference-steps",
        "20",
        "--nfe",
        "5",
        "--num-samples",
        "4",
        "--batch-size",
        "4",
        "--samplers",
        "ddim",
        "heun",
        "--out",
        str(tmp_path / "s.json"),
        "--plot",
        str(tmp_path / "s.png"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [
        ("ddpm", 20),
        ("ddim", 5),
        ("heun", 5),
    ]  # evaluations counted, not assumed
    assert (tmp_path / "s.png").stat().st_size > 1000 and "MLflow run" in done.stdout


def test_denoise_benchmark_script(tiny_run: Path, tmp_path: Path) -> None:
    done = script(
        "denoise.py",
        "--run",
        str(tiny_run),
        "--num-images",
        "1",
        "--levels",
        "0.05",
        "--methods",
        "diffusion",
        "tv",
        "--modes",
        "tweedie",
        "--repeats",
        "1",
        "--size",
        "48",
        "--out",
        str(tmp_path / "d.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "d.json").read_text())
    assert set(result["quality"]["table"]["0.05"]) == {"noisy", "diffusion:tweedie", "tv"}
    assert set(result["timing"]["median_s"]) == {"nlm", "diffusion:tweedie", "tv", "diffusion:fast"}


def test_guidance_benchmark_script(tmp_path: Path) -> None:
    import yaml
    from conftest import TINY, deep_update

    config = deep_update(
        TINY,
        {
            "output_dir": str(tmp_path / "out"),
            "stages": ["prepare", "train"],
            "model": {"num_classes": 2},
            "data": {"phantom": {"count": 12, "lesion_size": 3.0}},
            "evaluate": {"classifier_steps": 5},
            "tracking": {"registered_model": "medsynth-tests-guidance"},
        },
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    done = script(
        "guidance.py",
        "--run",
        str(tmp_path / "out"),
        "--scales",
        "0",
        "2",
        "--num-samples",
        "4",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "g.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["guidance_scale"] for r in rows] == [0.0, 2.0] and all(0 <= r["agreement"] <= 1 for r in rows)


def test_ldm_sampling_memory_script(tmp_path: Path) -> None:
    import yaml
    from conftest import TINY, deep_update

    config = deep_update(
        TINY,
        {
            "diffusion": {"space": "latent"},
            "autoencoder": {"channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8},
        },
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = script(
        "ldm_sampling.py",
        "--config",
        str(path),
        "--steps",
        "2",
        "--variants",
        "whole",
        "window8",
        "--out",
        str(tmp_path / "m.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "m.json").read_text())["results"]
    assert results["whole"]["shape"] == [1, 1, 16, 16] and results["window8"]["peak_mb"] > 0


@pytest.mark.parametrize("dims", ["2", "3"])
def test_feature_metrics_script(tmp_path: Path, dims: str) -> None:
    done = script(
        "feature_metrics.py",
        "--train",
        "8",
        "--test",
        "8",
        "--size",
        "16",
        "--dims",
        dims,
        "--steps",
        "3",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "f.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "f.json").read_text())
    assert [r["case"] for r in result["rows"]][0] == "real vs real (other half)" and len(result["rows"]) == 6
    assert all(r["fid"] >= 0 and 0 <= r["precision"] <= 1 for r in result["rows"])
    if dims == "3":
        assert "fid/axial" in result["rows"][0]


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny synthesis runs that differ only in the sample seeds."""
    import yaml
    from conftest import TINY, deep_update

    folder = tmp_path_factory.mktemp("compare")
    outputs = []
    for name, seed in (("a", 1000), ("b", 2000)):
        config = deep_update(
            TINY,
            {
                "output_dir": str(folder / name),
                "stages": ["prepare", "train", "sample", "evaluate"],
                "sample": {"seed": seed},
                "tracking": {"registered_model": "medsynth-tests-compare", "experiment": "medsynth-tests-compare"},
            },
        )
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["run", str(path)]) == 0
        outputs.append(folder / name)
    return outputs[0], outputs[1]


def test_compare_runs_script(evaluated_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = evaluated_runs
    same = script("compare_runs.py", "--a", str(a), "--b", str(a), cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "train/model.pt weights: bit-identical" in same.stdout and "sample/samples.npy: bit-identical" in same.stdout
    assert "numbers identical" in same.stdout and " -> " not in same.stdout
    other = script("compare_runs.py", "--a", str(a), "--b", str(b), cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "train/model.pt weights: bit-identical" in other.stdout  # same training, other sample seeds
    assert "sample/samples.npy: different" in other.stdout and " -> " in other.stdout


def test_feature_seed_spread_script(evaluated_runs: tuple[Path, Path], tmp_path: Path) -> None:
    done = script("feature_seed_spread.py", "--run", str(evaluated_runs[0]), "--seeds", "0", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and all(len(row.split("|")) == 6 for row in rows), done.stdout


TINY_PRIOR = [
    "data.image_size=[16,16]",
    "data.patches.per_scan=2",
    "model.channels=[16,16,16]",
    "train.batch_size=4",
    "train.val_images=4",
]


@pytest.mark.slow
def test_denoise_real_script_scores_real_scans_with_and_without_reference(tmp_path: Path) -> None:
    """The real-scan benchmark on dipy's T1 slice (both priors, a classical baseline) and the real noisy
    volume (no reference), with tiny fits: it writes the scores it prints and the pictures."""
    out = tmp_path / "real.json"
    done = script(
        "denoise_real.py",
        "--data",
        "t1",
        "piesno",
        "--levels",
        "0.1",
        "--methods",
        "prior",
        "self_supervised",
        "nlm",
        "--steps",
        "2",
        "--ss-steps",
        "2",
        "--set",
        *TINY_PRIOR,
        "--ss-set",
        *TINY_PRIOR,
        "--out",
        str(out),
        "--figure",
        str(tmp_path / "real.png"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    t1 = result["data"]["t1"]["scores"]["0.1"]
    assert set(t1) == {"noisy", "prior", "self_supervised", "nlm"}
    assert all(0 < row["psnr_fg"] < 60 and 0 < row["slope_fg"] < 2 for row in t1.values())
    assert t1["nlm"]["psnr_fg"] > t1["noisy"]["psnr_fg"]  # a real baseline on a real scan gains
    piesno = result["data"]["piesno"]["no_reference"]["as_acquired"]
    assert set(piesno) == {"self_supervised", "nlm"} and piesno["nlm"]["sigma_estimated"] > 0
    assert (tmp_path / "real_t1.png").is_file() and (tmp_path / "real_piesno.png").is_file()
