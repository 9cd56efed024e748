"""Loading a trained medsynth model file (``model.pt``): network, process, intensity convention."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.networks.nets import DiffusionModelUNet

from medsynth.config import DiffusionConfig
from medsynth.errors import MedsynthError
from medsynth.io.state import MODEL_FORMAT, load_state

if TYPE_CHECKING:
    from medsynth.models.autoencoder import TrainedAutoencoder


@dataclass
class TrainedModel:
    """A diffusion network with everything needed to sample from it and map samples back to units."""

    network: DiffusionModelUNet
    diffusion: DiffusionConfig
    spatial_dims: int
    image_size: list[int]
    intensity: dict
    step: int
    path: Path
    # spacing_mm, slice_axis, mr_percentile, ct_window of the training inputs (empty for older files)
    data: dict = field(default_factory=dict)
    # latent diffusion: the autoencoder whose latents the network models (image_size is then the latent size)
    autoencoder: TrainedAutoencoder | None = None

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def output_size(self) -> list[int]:
        """The size of the images this model makes (decoded, for a latent model)."""
        if self.autoencoder is None:
            return list(self.image_size)
        return [s * self.autoencoder.downsample for s in self.image_size]

    @property
    def modality(self) -> str | None:
        return self.intensity.get("modality")

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional model (its last class embedding is the 'no class' token)."""
        embeds = getattr(self.network, "num_class_embeds", None)
        return None if embeds is None else int(embeds) - 1


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """Rebuild the EMA network from a model file written by training (``weights_only`` load).

    Raises:
        MedsynthError: the file is missing, unreadable, or not a medsynth model.
    """
    path = Path(path)
    state = load_state(path, expected_format=MODEL_FORMAT)
    try:
        kwargs = dict(state["unet"])
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        network = DiffusionModelUNet(spatial_dims=int(state["spatial_dims"]), **kwargs)
        network.load_state_dict(state["state_dict"])
        diffusion = DiffusionConfig.model_validate(state["diffusion"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise MedsynthError(f"{path}: not a usable medsynth model ({str(exc).splitlines()[0][:120]})") from None
    autoencoder = None
    if state.get("autoencoder") is not None:
        from medsynth.models.autoencoder import autoencoder_from_state

        autoencoder = autoencoder_from_state(state["autoencoder"], path, device)
    network.to(device).eval().requires_grad_(False)
    return TrainedModel(
        network,
        diffusion,
        int(state["spatial_dims"]),
        list(state["image_size"]),
        dict(state["intensity"]),
        int(state["step"]),
        path,
        dict(state.get("data") or {}),
        autoencoder,
    )
