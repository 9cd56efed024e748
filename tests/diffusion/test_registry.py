"""The sampler and denoise-method registries: torch-free, complete, and the one source of names and checks."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from medsynth.config import DiffusionConfig
from medsynth.denoise.registry import DENOISE_METHOD_NAMES, DENOISE_METHODS, PRIOR_MODES
from medsynth.diffusion.registry import PROCESSES, SAMPLER_NAMES, SAMPLERS, sampler_mismatch, samplers_for
from medsynth.diffusion.schedulers import build_sampling_scheduler


def test_registries_import_without_torch() -> None:
    code = (
        "import sys; import medsynth.diffusion.registry, medsynth.denoise.registry; "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_sampler_once_with_an_importable_implementation() -> None:
    assert SAMPLER_NAMES == ("ddpm", "ddim", "rflow", "euler", "heun", "pc", "dpmpp_2m")
    for name, spec in SAMPLERS.items():
        assert spec.name == name and spec.family in ("monai", "score") and spec.description
        assert set(spec.processes) <= set(PROCESSES) and spec.processes
        parameters = inspect.signature(spec.load()).parameters
        # the shared signature of each family, and the options generate() forwards
        third = "scheduler" if spec.family == "monai" else "sigmas"
        assert list(parameters)[1:3] == ["x", third] and "callback" in parameters
        assert all(option in parameters for option in spec.options)
    assert samplers_for("rflow") == ("rflow", "euler", "heun", "pc", "dpmpp_2m")


@pytest.mark.parametrize(
    "sampler, scheduler, message",
    [
        ("ddim", "ddpm", None),
        ("heun", "rflow", None),
        (
            "ddim",
            "rflow",
            "sampler 'ddim' does not fit diffusion.scheduler 'rflow' (allowed: rflow, euler, heun, pc, dpmpp_2m)",
        ),
        (
            "rflow",
            "ddpm",
            "sampler 'rflow' does not fit diffusion.scheduler 'ddpm' (allowed: ddpm, ddim, euler, heun, pc, dpmpp_2m)",
        ),
        ("euler_a", "ddpm", "unknown sampler 'euler_a' (allowed: ddpm, ddim, rflow, euler, heun, pc, dpmpp_2m)"),
        ("ddim", "edm", "unknown diffusion.scheduler 'edm' (allowed: ddpm, rflow)"),
    ],
)
def test_sampler_mismatch_names_the_allowed_samplers(sampler, scheduler, message) -> None:
    got = sampler_mismatch(sampler, scheduler)
    assert got == message


def test_building_a_schedule_checks_through_the_registry() -> None:
    with pytest.raises(ValueError) as raised:
        build_sampling_scheduler(DiffusionConfig(scheduler="rflow"), sampler="ddpm", steps=4, spatial_dims=2)
    assert str(raised.value) == sampler_mismatch("ddpm", "rflow")


def test_every_denoise_method_and_prior_mode_once() -> None:
    assert DENOISE_METHOD_NAMES == ("diffusion", "self_supervised", "nlm", "tv", "wavelet", "bm3d")
    for name, method in DENOISE_METHODS.items():
        assert method.name == name and method.description and callable(method.load())
    assert DENOISE_METHODS["bm3d"].extra == "medsynth[bm3d]"
    assert all(m.extra is None and m.available() for n, m in DENOISE_METHODS.items() if n != "bm3d")
    assert tuple(PRIOR_MODES) == ("tweedie", "ddim", "ancestral")
    assert PRIOR_MODES["tweedie"].load() is None and [m.stochastic for m in PRIOR_MODES.values()] == [0, 0, 1]
