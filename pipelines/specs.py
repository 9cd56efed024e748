"""What each registered stage's outputs depend on: the config keys it reads and the upstream stages whose
outputs it reads. The stages themselves (names, modules, help, how they run under ``torchrun``) are
registered once in :mod:`medsynth.stages`.

A stage reads whole config sections; only the keys that change results enter its cache key
(:func:`medsynth.config.result_view`: the marks on the schema's fields), the same keys that a trainer's
resume identity holds. Light on purpose (no torch, MONAI or MLflow imports)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsynth.config import Config, result_view
from medsynth.stages import BY_NAME, STAGE_NAMES
from pipelines.stage import StageSpec


def augment_section(config: Config) -> dict[str, Any]:
    """The augment section with the sampler settings it inherits from ``sample`` filled in."""
    section = result_view(config.augment)
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
        "sample": result_view(config.sample),
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
    section: dict[str, Any] = {"features": result_view(features)}
    if features.network == "file" and features.weights is not None and Path(features.weights).is_file():
        stat = Path(features.weights).stat()
        section["weights_file"] = [str(features.weights), stat.st_size, stat.st_mtime_ns]
    return section


def evaluate_section(config: Config) -> dict[str, Any]:
    """evaluate's own section, the feature network, and the audit settings it applies to the samples."""
    return {
        "evaluate": result_view(config.evaluate),
        "audit": result_view(config.augment.audit),
    } | feature_section(config)


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
    section = {"denoise": result_view(config.denoise) | {"noise": config.denoise_noise}, "modality": config.modality}
    if config.denoise.datalist:
        section["datalist_files"] = _files_signature(config.denoise.datalist)
    if "self_supervised" in config.denoise.methods:
        # each noisy case fits its own prior with these sections (and the data section's crops)
        section["self_supervised_recipe"] = {
            "data": result_view(config.data),
            "model": result_view(config.model),
            "diffusion": result_view(config.diffusion),
            "train": result_view(config.train),
        }
    return section


def denoise_inputs(config: Config) -> tuple[str, ...]:
    """denoise reads the trained model only when the clean-trained prior is among its methods."""
    return ("prepare", "train") if "diffusion" in config.denoise.methods else ("prepare",)


# For each registered stage: (the config it reads -> its cache-key part, the upstream stages it reads).
READS: dict[str, tuple[Callable[[Config], dict[str, Any]], tuple[str, ...] | Callable[[Config], tuple[str, ...]]]] = {
    "prepare": (lambda c: {"data": result_view(c.data)}, ()),
    "autoencoder": (
        lambda c: {"autoencoder": result_view(c.autoencoder, exclude=c.autoencoder.SAMPLING_KEYS)},
        ("prepare",),
    ),
    "train": (
        lambda c: {"model": result_view(c.model), "diffusion": result_view(c.diffusion), "train": result_view(c.train)},
        train_inputs,
    ),
    "controlnet": (
        lambda c: {"controlnet": result_view(c.controlnet, exclude=c.controlnet.SAMPLING_KEYS)},
        ("prepare", "train"),
    ),
    "sample": (sample_section, model_inputs),
    "denoise": (denoise_section, denoise_inputs),
    "evaluate": (evaluate_section, evaluate_inputs),
    "augment": (augment_section, model_inputs),
    "utility": (lambda c: {"utility": result_view(c.utility)}, ("prepare", "augment")),
}
if tuple(READS) != STAGE_NAMES:
    raise RuntimeError(f"pipelines/specs.py READS covers {tuple(READS)}, the stage registry {STAGE_NAMES}")

SPECS: dict[str, StageSpec] = {
    name: StageSpec(
        name,
        BY_NAME[name].module,
        sections,
        inputs,
        BY_NAME[name].help,
        trains=BY_NAME[name].trains,
        shards=BY_NAME[name].shards,
    )
    for name, (sections, inputs) in READS.items()
}
