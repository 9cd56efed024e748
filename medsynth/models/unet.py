"""The denoising network: MONAI ``DiffusionModelUNet`` built from :class:`~medsynth.config.ModelConfig`."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import DiffusionModelUNet

from medsynth.config import ModelConfig


def build_unet(model: ModelConfig, *, spatial_dims: int, in_channels: int = 1, out_channels: int = 1) -> DiffusionModelUNet:
    """A MONAI ``DiffusionModelUNet`` for ``spatial_dims`` 2 or 3.

    Args:
        model: channel widths, attention levels, residual blocks, group-norm groups.
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: image channels (1 for a single modality).
        out_channels: prediction channels (same as ``in_channels`` for epsilon/v prediction).
    """
    return DiffusionModelUNet(spatial_dims=spatial_dims, **unet_kwargs(model, in_channels, out_channels))


def unet_kwargs(model: ModelConfig, in_channels: int = 1, out_channels: int = 1) -> dict[str, Any]:
    """Constructor arguments, stored with the trained weights so the network can be rebuilt."""
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": tuple(model.channels),
        "attention_levels": tuple(model.attention_levels),
        "num_res_blocks": model.num_res_blocks,
        "num_head_channels": model.num_head_channels,
        "norm_num_groups": model.norm_num_groups,
    }
