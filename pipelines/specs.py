"""The stage registry: names, the config sections and upstream stages each stage's outputs depend
on, and the module that runs it. Light on purpose (no torch, MONAI or MLflow imports), so that a
fully cached pipeline is recognised in well under a second.

Under ``torchrun``: ``trains`` stages run DDP on every rank; ``shards`` stages split their work across
the ranks and gather it on rank 0; the others run on rank 0 alone (docs/scale_out.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
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
    section["guidance_scale"] = config.sample.guidance_scale
    section["decode"] = {"roi": config.autoencoder.decode_roi, "overlap": config.autoencoder.decode_overlap}
    if "controlnet" in config.stages:
        section["controlnet"] = controlnet_sampling(config)
    if section["audit"]["enabled"] and section["audit"]["features"]:
        section |= feature_section(config)
    return section


def train_inputs(config: Config) -> tuple[str, ...]:
    """A latent model trains on the autoencoder stage's latents."""
    return ("prepare", "autoencoder") if config.diffusion.space == "latent" else ("prepare",)


def model_inputs(config: Config) -> tuple[str, ...]:
    """Sampling stages read the trained model, and the ControlNet when the config trains one."""
    return ("prepare", "train", "controlnet") if "controlnet" in config.stages else ("prepare", "train")


def sample_section(config: Config) -> dict[str, Any]:
    section = {
        "sample": to_plain(config.sample),
        "decode": {"roi": config.autoencoder.decode_roi, "overlap": config.autoencoder.decode_overlap},
    }
    if "controlnet" in config.stages:
        section["controlnet"] = controlnet_sampling(config)
    return section


def controlnet_sampling(config: Config) -> dict[str, Any]:
    """What sampling from label maps depends on: the scale, and the given label maps' files."""
    path = config.controlnet.label_maps
    files = {}
    if path is not None:
        target = Path(path)
        for file in sorted(target.rglob("*")) if target.is_dir() else [target]:
            if file.is_file():
                files[str(file)] = [file.stat().st_size, file.stat().st_mtime_ns]
    return {
        "conditioning_scale": config.controlnet.conditioning_scale,
        "label_maps": str(path) if path else None,
        "files": files,
    }


def feature_section(config: Config) -> dict[str, Any]:
    """The feature network's settings (and its weights file's signature when it is a file)."""
    features = config.evaluate.features
    section: dict[str, Any] = {"features": to_plain(features)}
    if features.network == "file" and features.weights is not None and Path(features.weights).is_file():
        stat = Path(features.weights).stat()
        section["weights_file"] = [str(features.weights), stat.st_size, stat.st_mtime_ns]
    return section


def evaluate_section(config: Config) -> dict[str, Any]:
    """evaluate's own section, the feature network, and the audit settings it applies to the samples."""
    return {"evaluate": to_plain(config.evaluate), "audit": to_plain(config.augment.audit)} | feature_section(config)


def evaluate_inputs(config: Config) -> tuple[str, ...]:
    """evaluate reads the samples, the denoised scans, or both: whichever the config's stages make."""
    inputs = ("prepare",)
    if "sample" in config.stages or "denoise" not in config.stages:
        inputs += ("sample",)
    if "denoise" in config.stages:
        inputs += ("denoise",)
    return inputs


def _files_signature(path: str) -> dict[str, Any]:
    """Size and modification time of a datalist and of every file it names (cheap: no reading of scans),
    so that editing a listed scan invalidates the cache. A missing datalist is left to the stage to report."""
    datalist = Path(path)
    if not datalist.is_file():
        return {"missing": path}
    text = datalist.read_bytes()
    signature: dict[str, Any] = {"datalist_sha256": hashlib.sha256(text).hexdigest()}
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return signature
    for entries in document.values() if isinstance(document, dict) else ():
        for entry in entries if isinstance(entries, list) else ():
            image = entry.get("image") if isinstance(entry, dict) else entry
            if not isinstance(image, str):
                continue
            target = Path(image) if Path(image).is_absolute() else datalist.parent / image
            files = sorted(target.rglob("*")) if target.is_dir() else [target]
            for file in files:
                if file.is_file():
                    stat = file.stat()
                    signature[str(file)] = [stat.st_size, stat.st_mtime_ns]
    return signature


def denoise_section(config: Config) -> dict[str, Any]:
    """The denoise section with the noise model it resolves to (``null`` means the modality's own) and,
    with a datalist of your own scans, their files' signature."""
    section = {"denoise": to_plain(config.denoise) | {"noise": config.denoise_noise}, "modality": config.modality}
    if config.denoise.datalist:
        section["datalist_files"] = _files_signature(config.denoise.datalist)
    return section


SPECS: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "prepare",
            "pipelines.prepare",
            lambda c: {"data": to_plain(c.data)},
            (),
            "phantoms or your folder -> NIfTI + datalist.json + cached model inputs",
        ),
        StageSpec(
            "autoencoder",
            "pipelines.autoencoder",
            lambda c: {
                "autoencoder": {
                    k: v
                    for k, v in to_plain(c.autoencoder).items()
                    if k not in ("resume", "decode_roi", "decode_overlap")
                }
            },
            ("prepare",),
            "AutoencoderKL (L1 + KL + patch adversarial) for latent diffusion, with its latent scale factor",
            trains=True,
        ),
        # train.resume and train.gradient_checkpointing change how the result is reached, not the result (tested).
        StageSpec(
            "train",
            "pipelines.train",
            lambda c: {
                "model": to_plain(c.model),
                "diffusion": to_plain(c.diffusion),
                "train": {k: v for k, v in to_plain(c.train).items() if k not in ("resume", "gradient_checkpointing")},
            },
            train_inputs,
            "DDPM/RFlow training (pixels or latents) with EMA, checkpoints, exact resume, DDP",
            trains=True,
        ),
        StageSpec(
            "controlnet",
            "pipelines.controlnet",
            lambda c: {
                "controlnet": {
                    k: v
                    for k, v in to_plain(c.controlnet).items()
                    if k not in ("resume", "conditioning_scale", "label_maps")
                },
                "train": {
                    k: to_plain(c.train)[k]
                    for k in ("ema_decay", "ema_warmup", "weight_decay", "min_lr_ratio", "precision", "val_images")
                },
            },
            ("prepare", "train"),
            "ControlNet on the trained model: label map -> image",
            trains=True,
        ),
        StageSpec(
            "sample",
            "pipelines.sample",
            sample_section,
            model_inputs,
            "DDPM / DDIM / RFlow / score-based sampling to NIfTI + grid (decoded for latent models)",
            shards=True,
        ),
        StageSpec(
            "denoise",
            "pipelines.denoise",
            denoise_section,
            ("prepare", "train"),
            "held-out scans with simulated noise, denoised by the diffusion prior and classical baselines",
            shards=True,
        ),
        StageSpec(
            "evaluate",
            "pipelines.evaluate",
            evaluate_section,
            evaluate_inputs,
            "samples: FID / precision-recall / MMD on self-trained features, MS-SSIM diversity, memorisation audit, "
            "best-model alias; denoising: PSNR / SSIM per method and level",
        ),
        StageSpec(
            "augment",
            "pipelines.augment",
            augment_section,
            model_inputs,
            "audited synthetic cases with provenance (NIfTI, optionally DICOM) + merged datalist",
            shards=True,
        ),
        StageSpec(
            "utility",
            "pipelines.utility",
            lambda c: {"utility": to_plain(c.utility)},
            ("prepare", "augment"),
            "downstream model trained on real / real + synthetic / synthetic, scored on held-out real data",
        ),
    )
}
assert tuple(SPECS) == STAGES
