"""The registry of pipeline stages: each stage once, in pipeline order, with what it does and how it runs.

The config schema (``stages`` and its allowed values), the command line (one sub-command per stage and its
help) and the pipeline runner (``pipelines/specs.py`` adds what each stage's cache key reads) all derive from
:data:`STAGES`. Light on purpose: no torch, MONAI or MLflow imports (a fully cached pipeline is recognised
in about a second).

Under ``torchrun``: ``trains`` stages run DDP on every rank; ``shards`` stages split their work across the
ranks and gather it on rank 0; the others run on rank 0 alone (docs/scale_out.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name, the module whose ``run(ctx)`` runs it, its one-line help."""

    name: str
    module: str
    help: str
    trains: bool = False  # every torchrun rank trains; a fixed work folder keeps checkpoints to resume
    shards: bool = False  # every torchrun rank computes its share; rank 0 gathers, writes and logs


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "pipelines.prepare", "phantoms or your NIfTI/DICOM folder -> datalist.json + cached model inputs"),
    Stage(
        "autoencoder",
        "pipelines.autoencoder",
        "train the AutoencoderKL of latent diffusion (L1 + KL + patch adversarial) and its latent scale factor; "
        "works under torchrun",
        trains=True,
    ),
    Stage(
        "train",
        "pipelines.train",
        "train the diffusion model (DDPM/RFlow) on images or latents: EMA, checkpoints, exact resume, MLflow model; "
        "works under torchrun",
        trains=True,
    ),
    Stage(
        "controlnet",
        "pipelines.controlnet",
        "train a ControlNet on the trained model: label map -> image; works under torchrun",
        trains=True,
    ),
    Stage(
        "sample",
        "pipelines.sample",
        "draw synthetic scans (NIfTI + grid.png) with DDPM, DDIM, RFlow or a score-based sampler "
        "(decoded for latent models)",
        shards=True,
    ),
    Stage(
        "denoise",
        "pipelines.denoise",
        "denoise held-out scans with simulated noise (and your own scans) with the diffusion prior and classical "
        "baselines",
        shards=True,
    ),
    Stage(
        "evaluate",
        "pipelines.evaluate",
        "score samples against held-out images (FID, precision/recall, MMD, diversity, memorisation audit; moves "
        "the best alias) and denoised scans (PSNR, SSIM)",
    ),
    Stage(
        "augment",
        "pipelines.augment",
        "write audited synthetic training cases (NIfTI, optionally DICOM) with provenance and a merged datalist",
        shards=True,
    ),
    Stage(
        "utility",
        "pipelines.utility",
        "train a small MONAI model on real / real + synthetic / synthetic data and score it on held-out real data",
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
# What ``stages`` means when a config does not say: the synthesis pipeline.
DEFAULT_STAGES: tuple[str, ...] = ("prepare", "train", "sample", "evaluate", "augment")
