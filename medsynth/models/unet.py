"""The denoising network: MONAI ``DiffusionModelUNet`` built from :class:`~medsynth.config.ModelConfig`."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch.utils.checkpoint import checkpoint

from medsynth.config import ModelConfig


def build_unet(
    model: ModelConfig, *, spatial_dims: int, in_channels: int = 1, out_channels: int = 1
) -> DiffusionModelUNet:
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
        "use_flash_attention": model.use_flash_attention,
        # Classifier-free guidance: one embedding per class plus a last one for "no class".
        "num_class_embeds": None if model.num_classes is None else model.num_classes + 1,
    }


def enable_gradient_checkpointing(network: torch.nn.Module) -> int:
    """Recompute the activations of every residual and self-attention block in the backward pass
    instead of keeping them (``torch.utils.checkpoint``, non-reentrant): less memory for more
    compute. MONAI's ``DiffusionModelUNet`` has no switch for it, so each block's ``forward`` is
    wrapped on the instance; the parameters and the state dict are untouched. Without gradients
    (evaluation, EMA, sampling) the blocks run as before. Returns the number of blocks wrapped."""
    count = 0
    for module in network.modules():
        if isinstance(module, (DiffusionUNetResnetBlock, SpatialAttentionBlock)):
            original = module.forward

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            module.forward = forward
            count += 1
    return count
