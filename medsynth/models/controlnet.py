"""Label map -> image: a MONAI ``ControlNet`` on top of a trained (frozen) medsynth diffusion model.

Sections: label maps (checks, one-hot) -> the network (kwargs mirroring the base UNet, initialised
from its weights) -> the model file (``controlnet.pt``) -> the sampling wrapper for
:func:`medsynth.diffusion.sampling.generate`.

The ControlNet (Zhang & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") is a trainable copy of the base UNet's encoder that reads the noisy image plus an embedding
of the one-hot label map, and adds its features to the base UNet's skip connections and middle block
through zero-initialised convolutions: a fresh ControlNet leaves the base model's output unchanged.

Class-conditional bases: the ControlNet is label-map conditioning, not class conditioning. It is
trained and run with the base's "no class" token (the null class of classifier-free guidance), so its
residuals do not depend on the class; the base model alone sees the requested classes at sampling.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import ControlNet
from monai.networks.utils import one_hot

from medsynth.config import ControlNetConfig
from medsynth.errors import MedsynthError
from medsynth.io.state import MODEL_FORMAT, load_state
from medsynth.models.loading import TrainedModel

CONTROLNET_FORMAT = "medsynth-controlnet"


# ---------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------


def check_label_maps(
    label_maps: torch.Tensor | np.ndarray, image_size: Sequence[int], num_labels: int, source: str
) -> torch.Tensor:
    """Integer label maps ``(N, 1, *image_size)`` with values in ``0..num_labels-1``, as an int64 tensor.

    Float maps are accepted when every value is a whole number (NIfTI label files are often stored as
    floats); nothing is rounded or clipped.

    Raises:
        MedsynthError: one line naming ``source``: wrong shape, non-integer values, labels out of range.
    """
    maps = torch.as_tensor(np.ascontiguousarray(label_maps) if isinstance(label_maps, np.ndarray) else label_maps)
    expected = f"(N, 1, {', '.join(str(s) for s in image_size)})"
    if maps.ndim != 2 + len(image_size) or maps.shape[1] != 1 or list(maps.shape[2:]) != list(image_size):
        raise MedsynthError(
            f"{source}: label maps of shape {tuple(maps.shape)}; expected {expected}: one channel of integer labels "
            "at the model's image size"
        )
    if maps.is_floating_point() and not (bool(torch.isfinite(maps).all()) and torch.equal(maps, maps.round())):
        raise MedsynthError(
            f"{source}: label maps hold non-integer values; expected integer labels 0..{num_labels - 1}"
        )
    maps = maps.to(torch.int64)
    if maps.numel() and (int(maps.min()) < 0 or int(maps.max()) >= num_labels):
        bad = maps[(maps < 0) | (maps >= num_labels)].unique()[:5].tolist()
        raise MedsynthError(
            f"{source}: label values {bad} are outside 0..{num_labels - 1} (the ControlNet's {num_labels} labels)"
        )
    return maps


def one_hot_labels(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(N, 1, *spatial)`` integer label maps -> float one-hot ``(N, num_labels, *spatial)`` (MONAI ``one_hot``).

    Raises:
        MedsynthError: a label outside ``0..num_labels-1`` or a non-integer value.
    """
    labels = check_label_maps(labels, labels.shape[2:], num_labels, "label maps")
    return one_hot(labels, num_labels, dtype=torch.float32, dim=1)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def controlnet_kwargs(base: TrainedModel, num_labels: int, cfg: ControlNetConfig) -> dict[str, Any]:
    """Constructor arguments of the ``ControlNet`` (all but ``spatial_dims``): the base UNet's own
    arguments (read from its model file) plus the label-map embedding.

    MONAI's conditioning embedding convolves the label map at its input resolution and then halves it
    once per entry of ``conditioning_embedding_num_channels`` after the first; its output is added to
    the UNet's first-level features. Label maps are at the image resolution, and a pixel-space UNet's
    first level is at the image resolution too, so the embedding must not downsample: one entry.

    Raises:
        MedsynthError: a latent base model, or ``controlnet.conditioning_channels`` that do not reach the
            UNet's first-level resolution.
    """
    if base.is_latent:
        raise MedsynthError(
            f"{base.path}: a latent diffusion model; the ControlNet is built for pixel-space models "
            "(diffusion.space: pixel)"
        )
    if num_labels < 2:
        raise MedsynthError(f"the ControlNet needs label maps with at least 2 labels, got {num_labels}")
    channels = list(cfg.conditioning_channels)
    if len(channels) != 1:
        size = "x".join(map(str, base.image_size))
        raise MedsynthError(
            f"controlnet.conditioning_channels {channels} has {len(channels)} entries: "
            "MONAI's ControlNet embedding halves the label map once per entry after the first, "
            "but in a pixel-space model the label maps and the UNet's first level are both at the image size "
            f"{size}; expected exactly one entry, e.g. [{channels[0]}]"
        )
    state = load_state(base.path, expected_format=MODEL_FORMAT)
    accepted = inspect.signature(ControlNet).parameters
    kwargs = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dict(state["unet"]).items()
        if k in accepted and k != "spatial_dims"
    }
    return {**kwargs, "conditioning_embedding_in_channels": num_labels, "conditioning_embedding_num_channels": channels}


def _as_tuples(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_controlnet(base: TrainedModel, num_labels: int, cfg: ControlNetConfig) -> ControlNet:
    """A ``ControlNet`` mirroring ``base``'s UNet, initialised from its weights (the ControlNet paper's
    trainable copy), on the base's device. The zero convolutions and the label-map embedding's last
    convolution start at zero, so the base output is unchanged until the ControlNet is trained."""
    network = ControlNet(spatial_dims=base.spatial_dims, **_as_tuples(controlnet_kwargs(base, num_labels, cfg)))
    # MONAI has no helper that copies a DiffusionModelUNet into a ControlNet: the shared encoder, time
    # and class embeddings have the same names, so a non-strict load copies exactly those.
    result = network.load_state_dict(base.network.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("controlnet_")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("up_blocks.", "out."))]
    if missing or unexpected:
        raise RuntimeError(
            f"ControlNet and base UNet disagree on weights: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return network.to(next(base.network.parameters()).device)


# ---------------------------------------------------------------------------------------------
# Model file
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedControlNet:
    """A trained ControlNet (eval mode, no gradients) and what it conditions on."""

    network: ControlNet
    num_labels: int
    spatial_dims: int
    image_size: list[int]
    step: int
    path: Path
    kwargs: dict[str, Any]
    base_sha256: str

    @property
    def null_class(self) -> int | None:
        """The 'no class' token it runs with on a class-conditional base (see the module docstring)."""
        embeds = getattr(self.network, "num_class_embeds", None)
        return None if embeds is None else int(embeds) - 1


def controlnet_state(
    network: ControlNet,
    *,
    kwargs: dict[str, Any],
    spatial_dims: int,
    num_labels: int,
    image_size: Sequence[int],
    step: int,
    base_sha256: str,
) -> dict[str, Any]:
    """The content of ``controlnet.pt`` (without the format tags): weights plus how to rebuild and use them."""
    return {
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "spatial_dims": int(spatial_dims),
        "state_dict": network.state_dict(),
        "num_labels": int(num_labels),
        "image_size": list(image_size),
        "step": int(step),
        "base_sha256": base_sha256,
    }


def load_controlnet(path: str | Path, device: torch.device | str = "cpu") -> TrainedControlNet:
    """Rebuild a trained ControlNet from ``controlnet.pt`` (``weights_only`` load).

    Raises:
        MedsynthError: one line naming the file: missing, unreadable, or not a usable medsynth ControlNet.
    """
    path = Path(path)
    state = load_state(path, expected_format=CONTROLNET_FORMAT)
    try:
        kwargs = dict(state["kwargs"])
        network = ControlNet(spatial_dims=int(state["spatial_dims"]), **_as_tuples(kwargs))
        network.load_state_dict(state["state_dict"])
        info = (
            int(state["num_labels"]),
            int(state["spatial_dims"]),
            [int(s) for s in state["image_size"]],
            int(state["step"]),
            str(state["base_sha256"]),
        )
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise MedsynthError(
            f"{path}: not a usable medsynth ControlNet "
            f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        ) from None
    network.to(device).eval().requires_grad_(False)
    num_labels, spatial_dims, image_size, step, base_sha256 = info
    return TrainedControlNet(network, num_labels, spatial_dims, image_size, step, path, kwargs, base_sha256)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def controlnet_wrapper(
    controlnet: TrainedControlNet, label_maps: torch.Tensor | np.ndarray, *, conditioning_scale: float = 1.0
) -> Callable[[torch.nn.Module, slice], Callable[..., torch.Tensor]]:
    """A ``network_wrapper`` for :func:`~medsynth.diffusion.sampling.generate`: sample ``i`` is drawn
    from the base model steered by the ControlNet with label map ``label_maps[i]``.

    For a batch slice the wrapper returns ``f(x, timesteps=t, **kwargs)``: the ControlNet's residuals
    for ``x`` and the batch's one-hot maps (repeated when ``x`` is the doubled [cond; uncond] batch of
    classifier-free guidance: both halves are the same samples), scaled by ``conditioning_scale``, are
    added inside the base network called with ``kwargs`` (e.g. its ``class_labels``).

    Args:
        controlnet: the trained ControlNet.
        label_maps: ``(N, 1, *image_size)`` integer label maps, one per sample.
        conditioning_scale: weight of the residuals (0: the base model alone).

    Raises:
        MedsynthError: label maps of the wrong shape, non-integer or out-of-range values.
    """
    maps = check_label_maps(label_maps, controlnet.image_size, controlnet.num_labels, "label maps")
    network, null_class = controlnet.network, controlnet.null_class

    def wrap(model: torch.nn.Module, batch: slice) -> Callable[..., torch.Tensor]:
        cond = one_hot_labels(maps[batch], controlnet.num_labels)
        on_device: dict[torch.device, torch.Tensor] = {}

        def forward(x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            repeats, rest = divmod(len(x), len(cond))
            if rest or not repeats:
                raise ValueError(f"a batch of {len(x)} samples for {len(cond)} label maps")
            if x.device not in on_device:
                on_device[x.device] = cond.to(x.device)
            maps_x = torch.cat([on_device[x.device]] * repeats)
            labels = (
                None if null_class is None else torch.full((len(x),), null_class, dtype=torch.long, device=x.device)
            )
            down, mid = network(
                x=x,
                timesteps=timesteps,
                controlnet_cond=maps_x,
                conditioning_scale=conditioning_scale,
                context=None,
                class_labels=labels,
            )
            return model(
                x,
                timesteps=timesteps,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                **kwargs,
            )

        return forward

    return wrap
