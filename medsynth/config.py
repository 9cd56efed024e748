"""One typed schema for every medsynth config, YAML loading, ``key.sub=value`` overrides.

The defaults here are the single source of truth; files in ``configs/`` only say what differs.
Every model is strict (``extra="forbid"``): an unknown key, a wrong type or an impossible value is
reported as one :class:`~medsynth.errors.MedsynthError` line that names the config file and the key.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medsynth.denoise.registry import DENOISE_METHOD_NAMES, PRIOR_MODE_NAMES, PRIOR_MODES
from medsynth.diffusion.registry import SAMPLER_NAMES, SAMPLERS, sampler_mismatch
from medsynth.errors import MedsynthError
from medsynth.stages import DEFAULT_STAGES, STAGE_NAMES

# Names from the registries (each lists its entries once): stages, samplers, denoise methods and prior modes.
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]
DenoiseMethodName = Literal[DENOISE_METHOD_NAMES]  # type: ignore[valid-type]
PriorModeName = Literal[PRIOR_MODE_NAMES]  # type: ignore[valid-type]


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type names ``bool`` (directly or inside ``X | None``, ``Literal``, ``list``)."""
    if annotation is bool:
        return True
    return any(_accepts_bool(arg) for arg in typing.get_args(annotation) if not isinstance(arg, (str, int, float)))


class StrictModel(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment too; numbers must be finite
    (``.inf`` / ``.nan`` in YAML) and a boolean is not a number (pydantic would read ``true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation if info.field_name is not None else bool
        if isinstance(value, bool) and not _accepts_bool(annotation):
            expected = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
            raise ValueError(f"expected {expected or str(annotation).replace('typing.', '')}, not a boolean")
        return value


# Whether a key changes results is marked once, here, on its field: ``Field(..., json_schema_extra=KNOB)``
# marks a key that changes how the work is done (memory, speed, resume, reporting cadence) but not what it
# makes. Every other key changes results. The stage cache key and the resume identity of every trainer
# are both derived from these marks (:func:`result_view`), so they cannot disagree.
KNOB: dict[str, Any] = {"result": False}


def changes_result(model: type[BaseModel], name: str) -> bool:
    """Whether the field ``name`` of ``model`` changes results (not marked :data:`KNOB`)."""
    extra = model.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("result") is False)


def result_view(config: BaseModel, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON-compatible values of the keys of ``config`` that change results (recursively), less ``exclude``."""
    plain = to_plain(config)
    view: dict[str, Any] = {}
    for name in type(config).model_fields:
        if name in exclude or not changes_result(type(config), name):
            continue
        value = getattr(config, name)
        view[name] = result_view(value) if isinstance(value, BaseModel) else plain[name]
    return view


def knob_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every key marked :data:`KNOB` under ``model`` (for docs and messages)."""
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += knob_keys(annotation, f"{prefix}{name}.")
        elif not changes_result(model, name):
            keys.append(f"{prefix}{name}")
    return keys


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) views, e.g. ``['train.lr']``."""
    keys = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{name}.")
        elif a != b:
            keys.append(f"{prefix}{name}")
    return keys


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class TrackingConfig(StrictModel):
    """Where and under which names runs are recorded in MLflow."""

    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    experiment: str = Field("medsynth", min_length=1, description="MLflow experiment name")
    registered_model: str | None = Field(
        "medsynth-ddpm", description="Registered model name; null to skip registration"
    )
    # MLflow reserves the alias "latest" (``models:/<name>/latest`` always means the newest version),
    # so the alias that marks the model trained by the newest run has its own name.
    model_alias: str = Field("current", pattern=r"^[\w\-]+$", description="Alias set on the newly registered version")
    log_model: bool = Field(True, description="Log the EMA model with mlflow.pytorch.log_model")
    best_metric: str | None = Field(
        "eval/fid",
        min_length=1,
        description="evaluate moves the registered model's best_alias to this run's "
        "model when it beats the current best on this metric (compared only under the same feature network "
        "and held-out set); null: never",
    )
    best_direction: Literal["min", "max"] = Field(
        "min", description="Whether lower (min) or higher (max) best_metric is better"
    )
    best_alias: str = Field("best", pattern=r"^[\w\-]+$", description="The alias that marks the best model so far")
    compare_runs: int = Field(
        10, ge=1, description="Earlier evaluations shown beside this one in the run-comparison figure and table"
    )

    @field_validator("model_alias", "best_alias")
    @classmethod
    def _alias_not_reserved(cls, value: str) -> str:
        if value.lower() == "latest" or (value[:1] in "vV" and value[1:].isdigit()):
            raise ValueError(f"'{value}' is reserved by MLflow (use e.g. 'current' or 'champion')")
        return value


class PhantomConfig(StrictModel):
    """Procedural phantoms: the embedded default data."""

    kind: Literal["brain_mri", "body_ct"] = "brain_mri"
    count: int = Field(200, ge=2, description="Number of phantom cases (subjects)")
    shape: list[int] = Field(default_factory=lambda: [32, 32], description="Generated grid, 2 or 3 sides")
    fov_mm: float = Field(200.0, gt=0, description="Field of view along the first axis, in mm")
    bias_field: bool = True
    lesion_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="Chance of a lesion; the phantom's class label is 1 with one"
    )
    lesion_size: float = Field(
        1.0,
        ge=0.1,
        le=5.0,
        description="Scale of the lesion (1: a few % of the head / body width); "
        "larger lesions make the lesion class visible at small image sizes",
    )
    noise: float | None = Field(
        None,
        ge=0.0,
        description="Acquisition noise of the phantoms: brain_mri Rician std relative to white matter (default 0.01), "
        "body_ct Gaussian std in HU (default 8); 0 for clean references (denoising)",
    )

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        if len(value) not in (2, 3) or any(v < 16 for v in value):
            raise ValueError("expected 2 or 3 sides, each >= 16")
        return value


class PatchConfig(StrictModel):
    """Pixel-space training on random crops of ``data.image_size`` from whole scans at their own spacing."""

    per_scan: int = Field(
        4, ge=1, description="Crops from each drawn scan per step (MONAI num_samples); train.batch_size counts crops"
    )
    foreground: float = Field(
        0.9, ge=0.0, le=1.0, description="Share of crops centred on a foreground voxel (MONAI RandCropByPosNegLabel)"
    )
    axes: Literal["slice", "all"] = Field(
        "slice",
        description="2D models on 3D scans: crops across data.slice_axis, or across all three axes (axial, coronal "
        "and sagittal slices)",
    )
    cached: int = Field(
        16, ge=1, description="Fixed crops per scan written to the cache (validation loss, previews, evaluation)"
    )
    flips: bool = Field(
        True, description="Flip each training crop along each axis at random (more anatomy from few scans)"
    )
    rotations: bool = Field(
        False,
        description="Also turn training crops by 90 degrees at random in the plane of their first two axes "
        "(square crops; with flips: all eight turns and mirror images). Only where that plane's voxels are square",
    )


class DataConfig(StrictModel):
    """Where images come from and how they become model inputs."""

    source: Literal["phantom", "folder"] = "phantom"
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    folder: Path | None = Field(None, description="Folder of NIfTI files and/or DICOM series (source: folder)")
    modality: Literal["mr", "ct"] | None = Field(None, description="Intensity convention; phantoms set it from kind")
    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] = Field(
        default_factory=lambda: [32, 32],
        description="Model input size, one entry per dim: the resized image, or the crop size with data.patches",
    )
    patches: PatchConfig | None = Field(
        None,
        description="Train on random crops of image_size at the scans' own spacing (no resizing; resize_mode and "
        "slice_fraction then do not apply); null: whole images resized to image_size",
    )
    pixdim: list[float] | None = Field(None, description="Resample to this spacing (mm) before resizing; null: keep")
    resize_mode: Literal["resize", "pad_crop"] = "resize"
    slice_axis: Literal[0, 1, 2] = Field(2, description="Axis of 3D volumes that 2D slices are taken across")
    slice_fraction: float = Field(0.5, gt=0.0, le=1.0, description="Central fraction of slices used per volume")
    ct_window: list[float] = Field(default_factory=lambda: [-1000.0, 1000.0], description="HU window mapped to [-1, 1]")
    mr_percentile: float = Field(99.5, gt=50.0, le=100.0, description="Foreground percentile mapped to 1")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="Fraction of cases held out (split by case)")

    @field_validator("ct_window")
    @classmethod
    def _window(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or value[0] >= value[1]:
            raise ValueError("expected [low, high] with low < high")
        return value

    @field_validator("pixdim")
    @classmethod
    def _pixdim(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) not in (2, 3) or any(v <= 0 for v in value)):
            raise ValueError("expected 2 or 3 positive spacings in mm")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if len(self.image_size) != self.spatial_dims or any(s < 8 for s in self.image_size):
            raise ValueError(
                f"image_size must have {self.spatial_dims} entries (spatial_dims), each >= 8; got {self.image_size}"
            )
        if self.source == "folder" and self.folder is None:
            raise ValueError("source 'folder' needs data.folder")
        if self.source == "phantom" and self.spatial_dims == 3 and len(self.phantom.shape) != 3:
            raise ValueError("spatial_dims 3 needs a 3D phantom.shape")
        return self


class ModelConfig(StrictModel):
    """MONAI ``DiffusionModelUNet`` hyper-parameters."""

    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, False])
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(16, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    use_flash_attention: bool = Field(
        False,
        description="Attention through torch's scaled_dot_product_attention (MONAI's flag); "
        "only matters with attention_levels",
    )
    num_classes: int | None = Field(
        None,
        ge=2,
        description="Class-conditional model over this many classes (class labels 0..K-1 from the phantom class or "
        "the datalist's class_label); one more embedding is the 'no class' token of classifier-free guidance; "
        "null: unconditional",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels needs one entry per channels entry")
        # MONAI's GroupNorm needs every channel count divisible by norm_num_groups.
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}")
        return self


class AutoencoderConfig(StrictModel):
    """MONAI ``AutoencoderKL`` for latent diffusion (the ``autoencoder`` stage), trained with L1 + KL + a
    patch adversarial loss after a warm-up, and optionally a perceptual loss from a local weights file."""

    # read by the sampling stages (decoding), not by the autoencoder stage: outside its result view
    SAMPLING_KEYS: ClassVar[tuple[str, ...]] = ("decode_roi", "decode_overlap")

    channels: list[int] = Field(
        default_factory=lambda: [32, 64, 64],
        description="Encoder widths; the latent is 2^(len-1) times smaller per side",
    )
    latent_channels: int = Field(3, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: list[bool] | None = Field(None, description="Self-attention per level; null: none")
    norm_num_groups: int = Field(16, ge=1)
    with_nonlocal_attn: bool = Field(
        False, description="Self-attention in the encoder/decoder middle block (memory-hungry in 3D)"
    )
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0, description="Generator (autoencoder) learning rate")
    disc_lr: float = Field(5e-4, gt=0.0, description="Discriminator learning rate")
    kl_weight: float = Field(1e-6, ge=0.0)
    adv_weight: float = Field(0.01, ge=0.0, description="Patch adversarial loss weight (0: no discriminator)")
    adv_start: int = Field(
        200, ge=0, description="Warm-up steps with reconstruction + KL only, before the adversarial loss starts"
    )
    disc_channels: int = Field(32, ge=1, description="PatchDiscriminator width")
    disc_layers: int = Field(3, ge=1, description="PatchDiscriminator layers")
    perceptual_weight: float = Field(
        0.0, ge=0.0, description="Perceptual loss weight; > 0 needs perceptual_weights (never downloaded)"
    )
    perceptual_weights: Path | None = Field(
        None,
        description="Local weights file of a MONAI ResNet (e.g. MedicalNet) used as the perceptual feature network",
    )
    perceptual_depth: Literal[10, 18, 34, 50] = Field(10, description="Depth of that ResNet")
    patch_size: list[int] | None = Field(
        None,
        description="Train on random crops of this size (patch-based training; the network is "
        "fully convolutional); null: whole images",
    )
    grad_clip: float | None = Field(1.0, gt=0.0)
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear LR warm-up steps (both networks); null: a tenth of max_steps, at most 50"
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decay floor as a fraction of lr")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay of both networks (torch's default)")
    val_images: int = Field(16, ge=1, description="Held-out images for reconstruction PSNR/SSIM and the grid")
    val_every: int = Field(250, ge=1, json_schema_extra=KNOB)
    log_every: int = Field(10, ge=1, json_schema_extra=KNOB)
    checkpoint_every: int = Field(250, ge=1, json_schema_extra=KNOB)
    resume: bool = Field(
        False, description="Continue from the last checkpoint of an interrupted run", json_schema_extra=KNOB
    )
    decode_roi: list[int] | None = Field(
        None,
        description="Latent window of the sliding-window decoder (bounds memory at large sizes); "
        "null: decode whole latents",
    )
    decode_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="Overlap of the decoder's windows")

    @model_validator(mode="after")
    def _consistent(self) -> AutoencoderConfig:
        if self.attention_levels is not None and len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels needs one entry per channels entry")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}")
        if self.perceptual_weight > 0 and self.perceptual_weights is None:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights: a local weights file "
                "(medsynth never downloads weights)"
            )
        return self

    @property
    def downsample(self) -> int:
        """How many times smaller the latent is than the image, per side."""
        return 2 ** (len(self.channels) - 1)


class ControlNetConfig(StrictModel):
    """MONAI ``ControlNet`` trained on top of the trained (frozen) diffusion model: label map -> image."""

    # read by the sampling stages (label-map conditioning), not by the controlnet stage: outside its result view
    SAMPLING_KEYS: ClassVar[tuple[str, ...]] = ("conditioning_scale", "label_maps")

    conditioning_channels: list[int] = Field(
        default_factory=lambda: [16],
        description="Widths of the label-map embedding (MONAI's conditioning_embedding_num_channels); "
        "one entry for pixel-space models (each further entry halves the map, for latents)",
    )
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear LR warm-up steps; null: a tenth of max_steps, at most 50"
    )
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Cosine decay floor as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(True, description="EMA decay min(decay, (1+step)/(10+step)) so early EMA is not stale")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    val_images: int = Field(64, ge=1, description="Held-out images used for the final validation loss")
    conditioning_scale: float = Field(1.0, ge=0.0, description="Weight of the ControlNet residuals at sampling")
    label_maps: Path | None = Field(
        None,
        description="Label maps to generate from (sample / augment): a NIfTI file or a folder of them, "
        "each of the model's image size with values 0..labels-1; null: the held-out cases' label maps",
    )
    log_every: int = Field(10, ge=1, json_schema_extra=KNOB)
    checkpoint_every: int = Field(250, ge=1, json_schema_extra=KNOB)
    resume: bool = Field(
        False, description="Continue from the last checkpoint of an interrupted run", json_schema_extra=KNOB
    )


class DiffusionConfig(StrictModel):
    """Forward process and training objective."""

    scheduler: Literal["ddpm", "rflow"] = Field(
        "ddpm", description="ddpm: discrete DDPM process; rflow: rectified flow"
    )
    num_train_timesteps: int = Field(1000, ge=10)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = Field(0.0015, gt=0.0, lt=1.0)
    beta_end: float = Field(0.0195, gt=0.0, lt=1.0)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    min_snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR loss weighting (Hang et al. 2023); null: plain MSE"
    )
    space: Literal["pixel", "latent"] = Field(
        "pixel",
        description="pixel: diffusion on images; latent: on the latents of the "
        "autoencoder stage's AutoencoderKL (latent diffusion)",
    )
    max_train_timestep: int | None = Field(
        None,
        ge=1,
        description="Train on timesteps below this only: a denoising prior (the noise to remove sits at small "
        "timesteps), which then denoises but cannot sample from pure noise; null: all timesteps",
    )

    @model_validator(mode="after")
    def _timesteps(self) -> DiffusionConfig:
        if self.max_train_timestep is not None and self.max_train_timestep > self.num_train_timesteps:
            raise ValueError(
                f"max_train_timestep ({self.max_train_timestep}) must be <= "
                f"num_train_timesteps ({self.num_train_timesteps})"
            )
        return self

    @property
    def can_sample(self) -> bool:
        """Whether the model saw every noise level (a denoising prior did not)."""
        return self.max_train_timestep is None or self.max_train_timestep >= self.num_train_timesteps


class TrainConfig(StrictModel):
    """Optimisation, EMA, checkpoints."""

    batch_size: int = Field(32, ge=1, description="Global batch (split across DDP ranks)")
    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Cosine decay floor as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(True, description="EMA decay min(decay, (1+step)/(10+step)) so early EMA is not stale")
    checkpoint_every: int = Field(250, ge=1, json_schema_extra=KNOB)
    val_every: int = Field(250, ge=1, json_schema_extra=KNOB)
    log_every: int = Field(10, ge=1, json_schema_extra=KNOB)
    val_images: int = Field(64, ge=1, description="Held-out images used for the validation loss")
    resume: bool = Field(
        False, description="Continue from the last checkpoint of an interrupted run", json_schema_extra=KNOB
    )
    channels_last: bool = Field(
        False,
        description="channels-last memory format: measured slower for MONAI's GroupNorm-heavy UNet on a "
        "2-core CPU (10 %) and on an H100 (bf16: 0.81x), see docs/benchmarks.md",
    )
    compile: bool = Field(
        False,
        description="torch.compile the network: 1.9-2.6x the images/s on an H100, no gain on a 2-core CPU "
        "(docs/benchmarks.md); the first steps wait for the compilation (about a minute)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode; reduce-overhead uses CUDA graphs on GPUs"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute block activations in the backward pass: less memory, more time (same weights, tested)",
        json_schema_extra=KNOB,
    )
    label_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Class-conditional models: fraction of labels replaced by the "
        "'no class' token, which teaches the unconditional model that classifier-free guidance needs",
    )


class SampleConfig(StrictModel):
    """Reverse process."""

    sampler: SamplerName = Field(
        "ddim",
        description="; ".join(f"{name}: {spec.description}" for name, spec in SAMPLERS.items()),
    )
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity")
    num_samples: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = Field(1000, ge=0, description="Sample i uses seed + i")
    class_label: int | list[int] | None = Field(
        None,
        description="Class-conditional models: the class of every sample, or a list cycled over the samples; "
        "null: all classes in turn",
    )
    guidance_scale: float = Field(
        1.0,
        ge=0.0,
        description="Classifier-free guidance w: eps_uncond + w (eps_cond - eps_uncond); "
        "1: plain conditional, 0: unconditional, > 1: stronger class, less diversity",
    )


class FeaturesConfig(StrictModel):
    """The feature network behind FID, precision/recall, feature MMD and the feature-space memorisation audit."""

    network: Literal["self_trained", "file"] = Field(
        "self_trained",
        description="self_trained: a small MONAI network medsynth trains on the real training images (seeded); "
        "file: a MONAI ResNet / MedicalNet state dict from a local file (weights)",
    )
    weights: Path | None = Field(None, description="network: file - the local weights file (never downloaded)")
    depth: Literal[10, 18, 34, 50] = Field(10, description="network: file - the ResNet depth the weights belong to")
    steps: int = Field(400, ge=1, description="network: self_trained - training steps")
    width: int = Field(16, ge=4, description="network: self_trained - width of the first block")
    slices_per_plane: int = Field(
        8, ge=1, description="Volumes (2.5D): slices per orthogonal plane fed to a 2D network"
    )
    k: int = Field(
        3, ge=1, description="Neighbours defining the real and synthetic manifolds of improved precision/recall"
    )

    @model_validator(mode="after")
    def _weights_for_file(self) -> FeaturesConfig:
        if self.network == "file" and self.weights is None:
            raise ValueError("evaluate.features.network 'file' needs evaluate.features.weights (a local weights file)")
        return self


class EvaluateConfig(StrictModel):
    """Samples against held-out real images."""

    num_real: int = Field(64, ge=2, description="Held-out real images compared with the samples")
    histogram_bins: int = Field(64, ge=8)
    classifier_steps: int = Field(
        400,
        ge=1,
        description="Class-conditional samples: training steps of the classifier (trained on the real "
        "training images) that checks each sample shows its requested class",
    )
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)


class AuditConfig(StrictModel):
    """Memorisation audit of the synthetic cases against the training cases."""

    enabled: bool = True
    threshold: float = Field(
        0.3,
        gt=0.0,
        description="A synthetic case is flagged when its distance to the nearest training case is below "
        "this fraction of that case's distance to its nearest other real patient",
    )
    features: bool = Field(
        True,
        description="Measure in the feature space of the run's feature network (evaluate.features) as well as "
        "in image space",
    )
    rule: Literal["image", "any", "all"] = Field(
        "image",
        description="Flag when the ratio is below threshold in image space (feature "
        "space measured and reported only), in any space, or in all spaces",
    )
    action: Literal["refuse", "drop"] = Field(
        "refuse", description="Flagged cases: refuse the whole set (exit 2) or drop them and say how many"
    )
    figure_pairs: int = Field(8, ge=1, description="Closest (synthetic, training) pairs shown in the audit figure")


class AugmentConfig(StrictModel):
    """Synthetic training cases and the merged datalist."""

    ratio: float = Field(0.5, gt=0.0, le=10.0, description="Synthetic cases per real training case")
    num_samples: int | None = Field(None, ge=1, description="Synthetic cases to generate; null: ratio x real cases")
    sampler: SamplerName | None = Field(None, description="null: same as sample.sampler")
    steps: int | None = Field(None, ge=1, description="null: same as sample.steps")
    seed: int = Field(100000, ge=0, description="Synthetic case i uses seed + i")
    audit: AuditConfig = Field(default_factory=AuditConfig)
    dicom: bool = Field(
        False, description="Also write every synthetic case as a DICOM series (CT / MR Image Storage, marked SYNTHETIC)"
    )


class UtilityConfig(StrictModel):
    """Downstream utility: a small MONAI model trained on real, real + synthetic and synthetic data, scored on
    held-out real data."""

    task: Literal["auto", "classification", "segmentation"] = Field(
        "auto",
        description="auto: segmentation when the synthetic cases have label maps (ControlNet), else classification "
        "on class labels",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="One training per seed and regime; mean +- std over seeds",
    )
    steps: int = Field(300, ge=1, description="Training steps, the same in every regime")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0.0)


class DenoiseConfig(StrictModel):
    """Denoising held-out scans with simulated noise (and optionally your own noisy scans)."""

    methods: list[DenoiseMethodName] = Field(
        default_factory=lambda: ["diffusion", "nlm", "tv", "wavelet"],
        description="Methods compared; bm3d needs the optional extra medsynth[bm3d]",
    )
    mode: PriorModeName = Field(
        "tweedie",
        description="tweedie: one-step posterior mean (fast); ddim: deterministic reverse steps; "
        "ancestral: posterior draws",
    )
    steps: int = Field(10, ge=1, description="Reverse steps (ddim / ancestral)")
    samples: int = Field(1, ge=1, description="Posterior draws averaged (ancestral); >1 also writes an uncertainty map")
    alpha: float = Field(
        1.0, gt=0.0, le=4.0, description="self_supervised: noise added to the scan, as a multiple of its own noise"
    )
    draws: int = Field(8, ge=1, description="self_supervised: Noisier2Noise estimates averaged per scan")
    ensemble: bool = Field(
        False,
        description="diffusion / self_supervised: average every network evaluation over the image's mirror images "
        "(and 90-degree turns for priors trained with data.patches.rotations): 4-8x the time",
    )
    sigma: Literal["auto", "oracle"] | float = Field(
        "auto",
        description="Noise level given to every method: auto = estimated from each image; "
        "oracle = the simulated level; or a number in the image's units",
    )
    noise: Literal["rician", "gaussian", "low_dose_ct", "low_dose_ct_image"] | None = Field(
        None, description="Simulated noise; null: rician for MR, low_dose_ct (projection domain) for CT"
    )
    levels: list[float] | None = Field(
        None,
        description="rician/gaussian: std as a fraction of the foreground 99th percentile "
        "(default [0.025, 0.05, 0.1]); low-dose CT: dose fractions (default [0.25, 0.1])",
    )
    photons: float = Field(2.0e5, gt=0.0, description="Full-dose incident photons per ray (low_dose_ct)")
    num_images: int = Field(8, ge=1, description="Held-out cases denoised per noise level")
    seed: int = Field(2000, ge=0, description="Noise of case i at level j uses seed + 1000 * j + i")
    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="Sliding-window overlap for images larger than the model")
    sw_batch_size: int = Field(16, ge=1, description="Windows per network call")
    figure_level: int = Field(-1, description="Index into levels of the noise level shown in the side-by-side figure")
    datalist: str | None = Field(
        None,
        description="A MONAI-style datalist JSON of your own noisy scans (NIfTI files or DICOM series folders, "
        "paths relative to the datalist's folder) that every method denoises too, with the noise level estimated "
        "per scan",
    )
    datalist_key: str = Field("testing", min_length=1, description="The datalist's key listing those scans")

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, value: str | float) -> str | float:
        if isinstance(value, float) and not value >= 0:
            raise ValueError("must be auto, oracle or a number >= 0")
        return value

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not 0 < v <= 1 for v in value)):
            raise ValueError("expected a non-empty list of numbers in (0, 1]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DenoiseConfig:
        if self.samples > 1 and not PRIOR_MODES[self.mode].stochastic:
            raise ValueError(f"samples > 1 needs mode 'ancestral' (mode '{self.mode}' is deterministic)")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        return self

    def noise_levels(self, noise: str) -> list[float]:
        if self.levels is not None:
            return list(self.levels)
        return [0.25, 0.1] if noise.startswith("low_dose_ct") else [0.025, 0.05, 0.1]


class Config(StrictModel):
    """A whole medsynth pipeline."""

    name: str = Field("medsynth", min_length=1)
    output_dir: Path = Path("runs/medsynth")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    utility: UtilityConfig = Field(default_factory=UtilityConfig)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    controlnet: ControlNetConfig = Field(default_factory=ControlNetConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        num_classes = self.model.num_classes
        if num_classes is None and (self.sample.guidance_scale != 1.0 or self.sample.class_label is not None):
            key = "sample.guidance_scale" if self.sample.guidance_scale != 1.0 else "sample.class_label"
            raise ValueError(f"{key} needs a class-conditional model (set model.num_classes)")
        labels = self.sample.class_label
        for label in labels if isinstance(labels, list) else [] if labels is None else [labels]:
            if num_classes is not None and not 0 <= label < num_classes:
                raise ValueError(f"sample.class_label {label} is outside the model's classes 0..{num_classes - 1}")
        if isinstance(labels, list) and not labels:
            raise ValueError("sample.class_label: an empty list; give classes or null")
        if self.diffusion.space == "latent":
            if self.data.image_size and any(s % self.autoencoder.downsample for s in self.data.image_size):
                raise ValueError(
                    f"data.image_size {self.data.image_size} must be divisible by the autoencoder's downsampling "
                    f"{self.autoencoder.downsample} (2^(len(autoencoder.channels) - 1)) for latent diffusion"
                )
            if "denoise" in self.stages:
                raise ValueError("stage denoise needs a pixel-space model (diffusion.space: pixel)")
        patch = self.autoencoder.patch_size
        if patch is not None and (
            len(patch) != self.data.spatial_dims
            or any(p % self.autoencoder.downsample or p > s for p, s in zip(patch, self.data.image_size))
        ):
            raise ValueError(
                f"autoencoder.patch_size {patch} needs {self.data.spatial_dims} sides, each a multiple of "
                f"{self.autoencoder.downsample} and <= data.image_size {self.data.image_size}"
            )
        if self.data.patches is not None:
            per_scan = self.data.patches.per_scan
            if self.train.batch_size % per_scan:
                raise ValueError(
                    f"train.batch_size {self.train.batch_size} must be a multiple of data.patches.per_scan {per_scan}"
                )
            if self.diffusion.space == "latent" or {"autoencoder", "controlnet"} & set(self.stages):
                raise ValueError("data.patches trains pixel-space diffusion models only (no autoencoder/controlnet)")
        roi = self.autoencoder.decode_roi
        if roi is not None and (len(roi) != self.data.spatial_dims or any(r < 1 for r in roi)):
            raise ValueError(
                f"autoencoder.decode_roi {roi} needs {self.data.spatial_dims} positive sides (latent voxels)"
            )
        if "utility" in self.stages:
            if "augment" not in self.stages:
                raise ValueError("stage utility trains on the augment stage's synthetic cases: add augment to stages")
            task = self.utility.task
            if task == "segmentation" and "controlnet" not in self.stages:
                raise ValueError("utility.task segmentation needs synthetic label maps: add controlnet to stages")
            if task == "classification" and self.model.num_classes is None:
                raise ValueError(
                    "utility.task classification needs the class of every synthetic case: set model.num_classes"
                )
            if task == "auto" and self.model.num_classes is None and "controlnet" not in self.stages:
                raise ValueError(
                    "stage utility needs labels to learn: a class-conditional model (model.num_classes) "
                    "or a ControlNet (controlnet in stages)"
                )
        if "controlnet" in self.stages and self.diffusion.space == "latent":
            raise ValueError("stage controlnet is built for pixel-space models (diffusion.space: pixel)")
        if "controlnet" in self.stages and len(self.controlnet.conditioning_channels) != 1:
            raise ValueError(
                "controlnet.conditioning_channels needs one entry for a pixel-space model "
                "(the label map is at image size)"
            )
        for section, sampler in (("sample", self.sample.sampler), ("augment", self.augment.sampler)):
            mismatch = None if sampler is None else sampler_mismatch(sampler, self.diffusion.scheduler)
            if mismatch is not None:
                raise ValueError(f"{section}.{mismatch}")
        sampling = [s for s in ("sample", "augment") if s in self.stages]
        if sampling and not self.diffusion.can_sample:
            raise ValueError(
                f"stages {', '.join(sampling)} need a model trained on every timestep; diffusion.max_train_timestep "
                f"({self.diffusion.max_train_timestep}) makes a denoising prior that cannot sample from pure noise"
            )
        if "self_supervised" in self.denoise.methods and (self.data.patches is None or self.diffusion.space != "pixel"):
            raise ValueError(
                "denoise.methods self_supervised fits a pixel-space prior on crops of each noisy scan: set data.patches"
            )
        noise = self.denoise.noise
        if noise is not None and (noise.startswith("low_dose_ct") != (self.modality == "ct")):
            allowed = "low_dose_ct, low_dose_ct_image" if self.modality == "ct" else "rician, gaussian"
            raise ValueError(f"denoise.noise '{noise}' does not fit modality '{self.modality}' (allowed: {allowed})")
        return self

    @property
    def denoise_noise(self) -> str:
        """The simulated noise model: ``denoise.noise``, or the modality's own."""
        return self.denoise.noise or ("low_dose_ct" if self.modality == "ct" else "rician")

    @property
    def modality(self) -> str:
        """The intensity convention: from the phantom kind, or ``data.modality``."""
        if self.data.modality is not None:
            return self.data.modality
        if self.data.source == "phantom":
            return "ct" if self.data.phantom.kind == "body_ct" else "mr"
        return "mr"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice in one mapping", key_node.start_mark
                )
            try:
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML (``3``, ``1e-4``, ``true``, ``[32, 32]``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise MedsynthError(f"override '{item}': expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def _apply_override(raw: dict, keys: list[str], value: Any, source: str) -> None:
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise MedsynthError(
                f"{source}: override '{'.'.join(keys)}': '{'.'.join(keys[: depth + 1])}' is not a section"
            )
        node = child
    node[keys[-1]] = value


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        parent = _model_at(Config, [p for p in first["loc"][:-1] if isinstance(p, str)])
        allowed = ", ".join(parent.model_fields) if parent is not None else ""
        return f"{source}: unknown key '{key}' (allowed here: {allowed})"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'"
    got = first.get("input")
    got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    message = first["msg"].removeprefix("Value error, ")
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"{source}: key '{key}': {message}{got_text}{more}"


def _model_at(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate against the schema.

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings applied on top of the file.

    Raises:
        MedsynthError: one line naming the file and key for every kind of bad config.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"{path}: config file not found")
    try:
        raw = yaml.load(
            path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader
        )  # a SafeLoader subclass: no Python tags
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise MedsynthError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise MedsynthError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        # An empty file would silently run the whole default pipeline; '{}' says "every default" on purpose.
        raise MedsynthError(
            f"{path}: empty config file; expected a mapping of keys (see configs/quickstart.yaml), "
            "or '{}' for every default"
        )
    if not isinstance(raw, dict):
        raise MedsynthError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for keys, value in parse_overrides(overrides or []):
        _apply_override(raw, keys, value, str(path))
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise MedsynthError(_format_validation_error(exc, str(path))) from None


def check_paths(config: Config, source: str) -> None:
    """Paths that must exist before any stage runs (named by key)."""
    if config.data.source == "folder":
        folder = config.data.folder
        if folder is None or not folder.exists():
            raise MedsynthError(f"{source}: key 'data.folder': folder not found: {folder}")
        if not folder.is_dir():
            raise MedsynthError(f"{source}: key 'data.folder': not a folder: {folder}")


# ---------------------------------------------------------------------------------------------
# Serialising
# ---------------------------------------------------------------------------------------------


def to_plain(config: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of a config (paths as strings)."""
    return json.loads(config.model_dump_json())


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(to_plain(config), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def digest(obj: Any) -> str:
    """sha256 of a canonical JSON dump."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
