"""The first stage of latent diffusion: MONAI ``AutoencoderKL``, its model file, encoding and decoding.

Sections: building the network -> the model file (``autoencoder.pt``) -> encode / decode / scale factor
-> the perceptual loss (a frozen MONAI ResNet whose weights come only from a local file).

Latents for the diffusion model are the posterior means times ``scale_factor`` (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", sec. 4 and appendix G: the latents are
rescaled to unit standard deviation so the diffusion noise schedule fits them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.resnet import ResNetFeatures
from torch import nn

from medsynth.config import AutoencoderConfig
from medsynth.errors import MedsynthError
from medsynth.io.state import load_state, torch_load_weights

AUTOENCODER_FORMAT = "medsynth-autoencoder"
# Keys of autoencoder_state(): what a latent diffusion model file embeds to rebuild its autoencoder.
STATE_KEYS = ("kwargs", "spatial_dims", "state_dict", "scale_factor", "image_size", "intensity", "step")


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def autoencoder_kwargs(cfg: AutoencoderConfig, channels: int = 1) -> dict[str, Any]:
    """Constructor arguments of the ``AutoencoderKL`` (all but ``spatial_dims``), stored with the weights.

    Sequences are lists so the dict can be saved and loaded with ``weights_only=True`` as-is.
    """
    return {
        "in_channels": channels,
        "out_channels": channels,
        "channels": list(cfg.channels),
        "latent_channels": cfg.latent_channels,
        "num_res_blocks": cfg.num_res_blocks,
        "attention_levels": list(cfg.attention_levels)
        if cfg.attention_levels is not None
        else [False] * len(cfg.channels),
        "norm_num_groups": cfg.norm_num_groups,
        "with_encoder_nonlocal_attn": cfg.with_nonlocal_attn,
        "with_decoder_nonlocal_attn": cfg.with_nonlocal_attn,
        "include_fc": False,
    }


def build_autoencoder(cfg: AutoencoderConfig, spatial_dims: int, channels: int = 1) -> AutoencoderKL:
    """A MONAI ``AutoencoderKL`` for ``spatial_dims`` 2 or 3 whose latent is ``cfg.downsample`` times smaller per
    side."""
    return _from_kwargs(autoencoder_kwargs(cfg, channels), spatial_dims)


def _from_kwargs(kwargs: dict[str, Any], spatial_dims: int) -> AutoencoderKL:
    return AutoencoderKL(
        spatial_dims=spatial_dims, **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    )


# ---------------------------------------------------------------------------------------------
# The model file
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedAutoencoder:
    """A frozen autoencoder with what encoding and decoding need.

    Attributes:
        network: the ``AutoencoderKL`` (eval mode, no gradients).
        spatial_dims: 2 or 3.
        scale_factor: latents = posterior mean * scale_factor (unit std on the training data).
        downsample: image side / latent side.
        latent_channels: channels of the latent.
        image_size: the training image size (whole images; patch training still encodes whole images).
        intensity: the intensity convention of the training images.
        step: training steps behind the weights.
        path: the file it came from.
        kwargs: the network's constructor arguments (lists, not tuples).
    """

    network: AutoencoderKL
    spatial_dims: int
    scale_factor: float
    downsample: int
    latent_channels: int
    image_size: list[int]
    intensity: dict
    step: int
    path: Path | None
    kwargs: dict


def autoencoder_state(trained: TrainedAutoencoder) -> dict[str, Any]:
    """Everything :func:`autoencoder_from_state` reads (tensors on the CPU, plain values): the body of
    ``autoencoder.pt``, and what a latent diffusion model file embeds unchanged."""
    return {
        "kwargs": dict(trained.kwargs),
        "spatial_dims": int(trained.spatial_dims),
        "state_dict": {k: v.detach().cpu() for k, v in trained.network.state_dict().items()},
        "scale_factor": float(trained.scale_factor),
        "image_size": [int(s) for s in trained.image_size],
        "intensity": dict(trained.intensity),
        "step": int(trained.step),
    }


def autoencoder_from_state(
    state: dict[str, Any], path: str | Path | None, device: torch.device | str = "cpu"
) -> TrainedAutoencoder:
    """Rebuild a frozen autoencoder from :func:`autoencoder_state`'s dict (or a whole ``autoencoder.pt``).

    Raises:
        MedsynthError: a key is missing or the weights do not fit the stored architecture.
    """
    try:
        kwargs = dict(state["kwargs"])
        spatial_dims = int(state["spatial_dims"])
        network = _from_kwargs(kwargs, spatial_dims)
        network.load_state_dict(state["state_dict"])
        scale_factor = float(state["scale_factor"])
        if not np.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(f"scale_factor {scale_factor}")
        trained = TrainedAutoencoder(
            network=network.to(device).eval().requires_grad_(False),
            spatial_dims=spatial_dims,
            scale_factor=scale_factor,
            downsample=2 ** (len(kwargs["channels"]) - 1),
            latent_channels=int(kwargs["latent_channels"]),
            image_size=[int(s) for s in state["image_size"]],
            intensity=dict(state["intensity"]),
            step=int(state["step"]),
            path=None if path is None else Path(path),
            kwargs=kwargs,
        )
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise MedsynthError(f"{path}: not a usable medsynth autoencoder ({reason})") from None
    return trained


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> TrainedAutoencoder:
    """Load ``autoencoder.pt`` written by the autoencoder stage (``weights_only`` load).

    Raises:
        MedsynthError: the file is missing, unreadable, not a medsynth autoencoder, or malformed.
    """
    state = load_state(path, expected_format=AUTOENCODER_FORMAT)
    return autoencoder_from_state(state, path, device)


# ---------------------------------------------------------------------------------------------
# Encoding, decoding, the scale factor
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def posterior_means(
    network: AutoencoderKL, images: np.ndarray | torch.Tensor, *, batch_size: int, device: torch.device | str
) -> np.ndarray:
    """The encoder's posterior means ``z_mu`` of ``images`` (N, C, *spatial), unscaled, float32, in batches."""
    images = torch.as_tensor(
        np.asarray(images) if not isinstance(images, torch.Tensor) else images, dtype=torch.float32
    )
    network = network.to(device)
    was_training = network.training
    network.eval()
    out = [
        network.encode(images[i : i + batch_size].to(device))[0].float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    network.train(was_training)
    return torch.cat(out).numpy()


def encode(
    ae: TrainedAutoencoder, images: np.ndarray | torch.Tensor, *, batch_size: int, device: torch.device | str
) -> np.ndarray:
    """Latents of ``images`` (N, C, *spatial) in [-1, 1]: the posterior MEAN ``z_mu`` times ``scale_factor``.

    Deterministic on purpose (no posterior sample): the latents can be cached once and the diffusion
    model learns the mean's distribution, which the decoder maps back best.
    """
    return posterior_means(ae.network, images, batch_size=batch_size, device=device) * np.float32(ae.scale_factor)


@torch.no_grad()
def decode(
    ae: TrainedAutoencoder,
    latents: torch.Tensor,
    *,
    roi_size: list[int] | None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images (float32, on the CPU) of scaled ``latents`` (N, latent_channels, *latent_spatial).

    Args:
        ae: the trained autoencoder.
        latents: scaled latents (as :func:`encode` makes them, or sampled by the diffusion model).
        roi_size: the latent window of a sliding-window decode, or None to decode whole latents at once.
            MONAI's ``SlidingWindowInferer`` stitches the decoder's ``downsample`` times larger windows
            at image resolution (Gaussian-weighted) on the CPU, so only one window's activations sit on
            ``device``: this keeps a 128^3 decode within memory.
        overlap: fraction of overlap between windows.
        sw_batch_size: windows per decoder call.
        device: where the decoder runs.
    """
    network = ae.network.to(device).eval()
    z = torch.as_tensor(latents, dtype=torch.float32) / ae.scale_factor
    if roi_size is None:
        return network.decode(z.to(device)).float().cpu()
    inferer = SlidingWindowInferer(
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode="gaussian",
        sw_device=device,
        device="cpu",
    )
    return inferer(z.cpu(), network.decode).float()


def compute_scale_factor(latents: np.ndarray | torch.Tensor) -> float:
    """``1 / std`` of unscaled posterior means of the training images (Rombach et al. 2022, appendix G).

    Raises:
        MedsynthError: the latents are constant (std 0) or not finite: the autoencoder collapsed.
    """
    std = float(
        torch.as_tensor(np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents).double().std()
    )
    if not np.isfinite(std) or std <= 1e-12:
        raise MedsynthError(
            f"autoencoder latents have std {std}: cannot scale them to unit variance (the encoder collapsed; "
            "train longer or lower autoencoder.kl_weight)"
        )
    return 1.0 / std


# ---------------------------------------------------------------------------------------------
# Perceptual loss
# ---------------------------------------------------------------------------------------------

# Written by hand: MONAI's PerceptualLoss gets its networks through torch.hub / torchvision downloads
# (MedicalNet, RadImageNet, torchvision ImageNet), and medsynth never downloads at run time. Here the
# same MedicalNet-style MONAI ResNet reads its weights only from a local file.


class PerceptualFeatures(nn.Module):
    """A frozen MONAI ResNet (MedicalNet layout) returning the outputs of layer1..layer4.

    Args:
        spatial_dims: 2 or 3, as the data.
        depth: 10, 18, 34 or 50.
        weights_path: a local file holding a state dict, bare or as ``{"state_dict": ...}``; a leading
            ``module.`` on keys (MedicalNet checkpoints) is removed, extra keys (e.g. MedicalNet's
            segmentation head ``conv_seg``) are ignored, missing ones are an error.

    Raises:
        MedsynthError: the file is missing, not a state dict, or lacks weights of the network.
    """

    def __init__(self, spatial_dims: int, depth: int, weights_path: str | Path) -> None:
        super().__init__()
        self.network = ResNetFeatures(f"resnet{depth}", pretrained=False, spatial_dims=spatial_dims, in_channels=1)
        _load_local_weights(self.network, Path(weights_path))
        self.network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualFeatures:
        """Always in eval mode: its batch-norm statistics are part of the pretrained weights."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.network(x)[1:]  # [0] is the stem (conv1) output; LPIPS-style losses use the blocks


def _load_local_weights(
    network: nn.Module,
    path: Path,
    *,
    keys: tuple[str, str] = ("autoencoder.perceptual_weights", "autoencoder.perceptual_depth"),
    what: str = "perceptual ResNet",
) -> None:
    """Load a local ResNet state dict into ``network``; ``keys`` (file key, depth key) and ``what`` name
    the setting in the one-line errors."""
    if not path.is_file():
        raise MedsynthError(
            f"{path}: {what.split()[0]} weights file not found ({keys[0]}; medsynth never downloads weights)"
        )
    state = torch_load_weights(path, what="weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsynthError(
            f"{path}: not a state dict of tensors (expected a bare state dict or {{'state_dict': ...}})"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise MedsynthError(
            f"{path}: {len(missing)} of {len(expected)} weights of the {what} are missing "
            f"(e.g. '{missing[0]}'); check {keys[1]}"
        )
    try:
        network.load_state_dict({k: state[k] for k in expected})
    except RuntimeError as exc:
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0]
        )
        raise MedsynthError(
            f"{path}: weights do not fit the {what} ({detail[:160]}); check {keys[1]} "
            "and that the file is for the data's spatial_dims"
        ) from None


def _zscore(x: torch.Tensor) -> torch.Tensor:
    # Per image, as MedicalNet was trained (MONAI's medicalnet_intensity_normalisation does the same).
    dims = tuple(range(1, x.ndim))
    return (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + 1e-6)


def perceptual_loss(features: PerceptualFeatures, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS-style distance (Zhang et al. 2018, eq. 1 with unit layer weights) between ``x`` and ``y``.

    For each of layer1..layer4: unit-normalise the features over channels, square the difference, sum
    over channels, average over space; sum over layers; mean over the batch. Every image channel is
    scored on its own (the network takes one channel). Gradients flow to the inputs, not the network.
    """
    x = _zscore(x.float().reshape(-1, 1, *x.shape[2:]))
    y = _zscore(y.float().reshape(-1, 1, *y.shape[2:]))
    total = x.new_zeros(())
    for fx, fy in zip(features(x), features(y)):
        fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        total = total + (fx - fy).pow(2).sum(dim=1).mean()
    return total
