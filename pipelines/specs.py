"""The stage registry: names, the config sections and upstream stages each stage's outputs depend
on, and the module that runs it. Light on purpose (no torch, MONAI or MLflow imports), so that a
fully cached pipeline is recognised in well under a second."""

from __future__ import annotations

from typing import Any

from medsynth.config import STAGES, Config, to_plain
from pipelines.stage import StageSpec


def augment_section(config: Config) -> dict[str, Any]:
    """The augment section with the sampler settings it inherits from ``sample`` filled in."""
    section = to_plain(config.augment)
    section["sampler"] = section["sampler"] or config.sample.sampler
    section["steps"] = section["steps"] or config.sample.steps
    section["eta"] = config.sample.eta
    section["batch_size"] = config.sample.batch_size
    return section


def evaluate_inputs(config: Config) -> tuple[str, ...]:
    """evaluate reads the samples, the denoised scans, or both: whichever the config's stages make."""
    inputs = ("prepare",)
    if "sample" in config.stages or "denoise" not in config.stages:
        inputs += ("sample",)
    if "denoise" in config.stages:
        inputs += ("denoise",)
    return inputs


def denoise_section(config: Config) -> dict[str, Any]:
    """The denoise section with the noise model it resolves to (``null`` means the modality's own)."""
    return {"denoise": to_plain(config.denoise) | {"noise": config.denoise_noise}, "modality": config.modality}


SPECS: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("prepare", "pipelines.prepare", lambda c: {"data": to_plain(c.data)}, (),
                  "phantoms or your folder -> NIfTI + datalist.json + cached model inputs"),
        # train.resume changes how the result is reached, not the result.
        StageSpec("train", "pipelines.train",
                  lambda c: {"model": to_plain(c.model), "diffusion": to_plain(c.diffusion),
                             "train": {k: v for k, v in to_plain(c.train).items() if k != "resume"}},
                  ("prepare",), "DDPM/RFlow training with EMA, checkpoints, exact resume, DDP"),
        StageSpec("sample", "pipelines.sample", lambda c: {"sample": to_plain(c.sample)}, ("prepare", "train"),
                  "DDPM / DDIM / RFlow sampling to NIfTI + grid"),
        StageSpec("denoise", "pipelines.denoise", denoise_section, ("prepare", "train"),
                  "held-out scans with simulated noise, denoised by the diffusion prior and classical baselines"),
        StageSpec("evaluate", "pipelines.evaluate", lambda c: {"evaluate": to_plain(c.evaluate)}, evaluate_inputs,
                  "samples: MMD, MS-SSIM diversity, per-class intensities; denoising: PSNR / SSIM per method and level"),
        StageSpec("augment", "pipelines.augment", augment_section, ("prepare", "train"),
                  "synthetic cases with provenance + merged datalist"),
    )
}
assert tuple(SPECS) == STAGES
