"""The denoising methods and diffusion-prior modes, each listed once.

``diffusion`` is the diffusion prior (:mod:`medsynth.denoise.prior`, run on a scan by
:mod:`medsynth.denoise.scan`); ``self_supervised`` fits a prior on the noisy scans first
(:mod:`medsynth.self_supervised`); the others are the classical baselines of
:mod:`medsynth.denoise.classical`, each ``fn(image, sigma) -> image``. This module imports no torch:
the config schema and the command line read it, and an implementation is imported only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pkgutil import resolve_name
from typing import Any, Literal


@dataclass(frozen=True)
class DenoiseMethod:
    """One denoising method: what it is, the optional extra it needs, and where it lives."""

    name: str
    family: Literal["prior", "self_supervised", "classical"]
    description: str
    implementation: str  # "package.module:function", imported by load()
    extra: str | None = None  # the pip extra that installs its optional packages
    probe: str | None = None  # a module whose import tells that the extra is installed

    def load(self) -> Callable[..., Any]:
        """The implementing function (imports its module)."""
        return resolve_name(self.implementation)

    def available(self) -> bool:
        """Whether the optional packages it needs import here (always, when it needs none)."""
        if self.probe is None:
            return True
        try:
            importlib.import_module(self.probe)
        except ImportError:
            return False
        return True

    def install_hint(self) -> str:
        """How to install what it needs (empty when it needs nothing)."""
        return f'install the optional extra: pip install "{self.extra}"' if self.extra else ""


DENOISE_METHODS: dict[str, DenoiseMethod] = {
    method.name: method
    for method in (
        DenoiseMethod(
            "diffusion",
            "prior",
            "the trained diffusion model as a prior, from the scan's own noise level",
            "medsynth.denoise.prior:prior_denoise",
        ),
        DenoiseMethod(
            "self_supervised",
            "self_supervised",
            "a diffusion prior fitted on the noisy scan itself (or noisy scans of its protocol), then Tweedie's "
            "estimate of the clean scan (Noisier2Noise); no clean scan needed",
            "medsynth.self_supervised:self_supervised_denoise",
        ),
        DenoiseMethod(
            "nlm",
            "classical",
            "non-local means (Buades et al. 2005; scikit-image)",
            "medsynth.denoise.classical:nlm",
        ),
        DenoiseMethod(
            "tv",
            "classical",
            "total-variation denoising (Chambolle 2004; scikit-image)",
            "medsynth.denoise.classical:tv",
        ),
        DenoiseMethod(
            "wavelet",
            "classical",
            "BayesShrink wavelet soft thresholding (Chang, Yu & Vetterli 2000)",
            "medsynth.denoise.classical:wavelet",
        ),
        DenoiseMethod(
            "bm3d",
            "classical",
            "BM3D for 2D images, BM4D for volumes (Dabov et al. 2007; Maggioni et al. 2013); non-commercial licence",
            "medsynth.denoise.classical:bm3d",
            extra="medsynth[bm3d]",
            probe="bm3d",
        ),
    )
}

DENOISE_METHOD_NAMES: tuple[str, ...] = tuple(DENOISE_METHODS)
CLASSICAL_METHOD_NAMES: tuple[str, ...] = tuple(n for n, m in DENOISE_METHODS.items() if m.family == "classical")


@dataclass(frozen=True)
class PriorMode:
    """How the diffusion prior runs from the matched noise level (:func:`medsynth.denoise.prior.prior_denoise`)."""

    name: str
    description: str
    sampler: str | None  # "package.module:function", a score-based sampler over the levels; None: one call
    stochastic: bool = False  # several draws differ (and give a spread)

    def load(self) -> Callable[..., Any] | None:
        """The sampler that runs the levels (imports its module); ``None`` for a single denoiser call."""
        return None if self.sampler is None else resolve_name(self.sampler)


PRIOR_MODES: dict[str, PriorMode] = {
    mode.name: mode
    for mode in (
        PriorMode(
            "tweedie",
            "one denoiser call: the posterior mean E[x0 | y] (Tweedie's formula), the minimum-MSE estimate",
            None,
        ),
        PriorMode(
            "ddim",
            "deterministic steps of the probability-flow ODE down to 0 (DDIM with eta 0); sharper, a little less PSNR",
            "medsynth.diffusion.score:euler_sample",
        ),
        PriorMode(
            "ancestral",
            "posterior draws (DDPM / Euler-ancestral steps); several give a mean and a per-voxel uncertainty",
            "medsynth.diffusion.score:euler_ancestral_sample",
            stochastic=True,
        ),
    )
}
PRIOR_MODE_NAMES: tuple[str, ...] = tuple(PRIOR_MODES)
