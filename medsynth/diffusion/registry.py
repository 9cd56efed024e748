"""The samplers a config can name, each listed once.

Two families share one entry point (:func:`medsynth.diffusion.sampling.generate`):

- ``monai``: steps a MONAI scheduler in its own discrete time (DDPM, DDIM, rectified flow); each fits
  only the process it was built for;
- ``score``: a list of noise levels sigma over the network read as a denoiser
  (:class:`medsynth.diffusion.denoiser.Denoiser`); fits any trained process.

This module imports no torch: the config schema and the command line read it to check and explain
sampler names, and the implementations are imported only when a sampler runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pkgutil import resolve_name
from typing import Any, Literal

PROCESSES = ("ddpm", "rflow")  # the trained forward processes (diffusion.scheduler)


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its name, family, the processes it fits, what it does and where it lives."""

    name: str
    family: Literal["monai", "score"]
    processes: tuple[str, ...]
    description: str
    implementation: str  # "package.module:function", imported by load()
    options: tuple[str, ...] = ()  # keyword options of generate() the sampler takes

    def load(self) -> Callable[..., Any]:
        """The sampler function (imports its module, and so torch)."""
        return resolve_name(self.implementation)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "ddpm",
            "monai",
            ("ddpm",),
            "ancestral DDPM (Ho et al. 2020), respaced to fewer steps (Nichol & Dhariwal 2021)",
            "medsynth.diffusion.sampling:ddpm_sample",
        ),
        SamplerSpec(
            "ddim",
            "monai",
            ("ddpm",),
            "DDIM (Song et al. 2021); deterministic with eta 0",
            "medsynth.diffusion.sampling:ddim_sample",
            options=("eta",),
        ),
        SamplerSpec(
            "rflow",
            "monai",
            ("rflow",),
            "Euler steps of the rectified-flow ODE (Liu et al. 2022)",
            "medsynth.diffusion.sampling:rflow_sample",
        ),
        SamplerSpec(
            "euler",
            "score",
            PROCESSES,
            "Euler steps of the probability-flow ODE over Karras noise levels (Karras et al. 2022)",
            "medsynth.diffusion.score:euler_sample",
        ),
        SamplerSpec(
            "heun",
            "score",
            PROCESSES,
            "Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1)",
            "medsynth.diffusion.score:heun_sample",
        ),
        SamplerSpec(
            "pc",
            "score",
            PROCESSES,
            "predictor-corrector: Euler-ancestral predictor, Langevin corrector (Song et al. 2021)",
            "medsynth.diffusion.score:pc_sample",
        ),
        SamplerSpec(
            "dpmpp_2m",
            "score",
            PROCESSES,
            "DPM-Solver++(2M), multistep second order in log sigma (Lu et al. 2022)",
            "medsynth.diffusion.score:dpmpp_2m_sample",
        ),
    )
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def samplers_for(scheduler: str) -> tuple[str, ...]:
    """The names of the samplers that fit a model trained with ``scheduler`` (``ddpm`` or ``rflow``)."""
    return tuple(name for name, spec in SAMPLERS.items() if scheduler in spec.processes)


def sampler_mismatch(sampler: str, scheduler: str) -> str | None:
    """``None`` when ``sampler`` fits a model trained with ``scheduler``, else why not (naming the allowed ones)."""
    if scheduler not in PROCESSES:
        return f"unknown diffusion.scheduler '{scheduler}' (allowed: {', '.join(PROCESSES)})"
    if sampler not in SAMPLERS:
        return f"unknown sampler '{sampler}' (allowed: {', '.join(SAMPLER_NAMES)})"
    if scheduler in SAMPLERS[sampler].processes:
        return None
    return (
        f"sampler '{sampler}' does not fit diffusion.scheduler '{scheduler}' "
        f"(allowed: {', '.join(samplers_for(scheduler))})"
    )
