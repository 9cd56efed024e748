"""A small image classifier that medsynth trains itself on the real training images: it checks that a
class-conditional model generates the class it was asked for (no downloaded network needed).

The network is assembled from MONAI ``Convolution`` blocks (instance norm, PReLU) with a global max
pool before the linear head: class differences in medical phantoms and scans are often a local
finding (a lesion) anywhere in the image, which a max pool keeps and an average pool dilutes.
It is trained (seeded, a fixed number of steps) by :func:`medsynth.training.classifier.train_classifier`;
here are the network, its augmentation and the trained result. The held-out real accuracy is reported
with every use, since the check is only as good as the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.blocks import Convolution


def build_classifier(spatial_dims: int, in_channels: int, num_classes: int, width: int = 16) -> torch.nn.Module:
    """Four MONAI convolution blocks (two strided), a global max pool and a linear head."""
    pool = torch.nn.AdaptiveMaxPool2d(1) if spatial_dims == 2 else torch.nn.AdaptiveMaxPool3d(1)

    def block(i: int, o: int, stride: int) -> Convolution:
        return Convolution(spatial_dims, i, o, strides=stride, kernel_size=3, act="PRELU", norm="INSTANCE")

    return torch.nn.Sequential(
        block(in_channels, width, 1),
        block(width, 2 * width, 2),
        block(2 * width, 4 * width, 2),
        block(4 * width, 4 * width, 1),
        pool,
        torch.nn.Flatten(),
        torch.nn.Linear(4 * width, num_classes),
    )


def random_flips(generator: torch.Generator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flip each item of ``(B, C, *spatial)`` tensors along every spatial axis with probability 1/2, the same
    flips for every tensor given (an image batch and its label maps); drawn on the generator's device.

    The augmentation of the small training sets: the class findings and tissues here do not depend on side.
    """
    first = tensors[0]
    shape = (-1, *[1] * (first.ndim - 1))
    for axis in range(2, first.ndim):
        flip = (torch.rand(len(first), generator=generator, device=generator.device) < 0.5).view(shape)
        tensors = tuple(torch.where(flip, t.flip(axis), t) for t in tensors)
    return tensors


@dataclass
class TrainedClassifier:
    network: torch.nn.Module
    num_classes: int
    steps: int
    seed: int

    @torch.no_grad()
    def logits(
        self, images: np.ndarray | torch.Tensor, *, batch_size: int = 64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of every image ``(N, C, *spatial)``, float32 on the CPU."""
        self.network.to(device).eval()
        images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        return torch.cat(
            [
                self.network(images[i : i + batch_size].to(device)).float().cpu()
                for i in range(0, len(images), batch_size)
            ]
        )

    def predict(
        self, images: np.ndarray | torch.Tensor, *, batch_size: int = 64, device: torch.device | str = "cpu"
    ) -> np.ndarray:
        """Predicted class of every image ``(N, C, *spatial)``."""
        return self.logits(images, batch_size=batch_size, device=device).argmax(1).numpy()

    def accuracy(self, images: np.ndarray, classes: np.ndarray, **kwargs) -> float:
        return float(np.mean(self.predict(images, **kwargs) == np.asarray(classes)))
