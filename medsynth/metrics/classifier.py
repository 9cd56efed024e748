"""A small image classifier that medsynth trains itself on the real training images: it checks that a
class-conditional model generates the class it was asked for (no downloaded network needed).

The network is assembled from MONAI ``Convolution`` blocks (instance norm, PReLU) with a global max
pool before the linear head: class differences in medical phantoms and scans are often a local
finding (a lesion) anywhere in the image, which a max pool keeps and an average pool dilutes.
Training is seeded and runs in a fixed number of steps; the held-out real accuracy is reported with
every use, since the check is only as good as the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.blocks import Convolution

from medsynth.errors import MedsynthError


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


@dataclass
class TrainedClassifier:
    network: torch.nn.Module
    num_classes: int
    steps: int
    seed: int

    @torch.no_grad()
    def predict(
        self, images: np.ndarray | torch.Tensor, *, batch_size: int = 64, device: torch.device | str = "cpu"
    ) -> np.ndarray:
        """Predicted class of every image ``(N, C, *spatial)``."""
        self.network.to(device).eval()
        images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        out = [
            self.network(images[i : i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy()

    def accuracy(self, images: np.ndarray, classes: np.ndarray, **kwargs) -> float:
        return float(np.mean(self.predict(images, **kwargs) == np.asarray(classes)))


def train_classifier(
    images: np.ndarray,
    classes: np.ndarray,
    *,
    spatial_dims: int,
    num_classes: int,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> TrainedClassifier:
    """Train :func:`build_classifier` with cross-entropy on ``images`` (N, C, *spatial) in [-1, 1] and
    their ``classes`` (0..K-1); images without a class (-1) are left out. Random flips along every
    spatial axis augment the small training sets (class findings here do not depend on side).

    Raises:
        MedsynthError: fewer than two classes among the labelled images.
    """
    classes = np.asarray(classes, dtype=np.int64)
    keep = (classes >= 0) & (classes < num_classes)
    if len(np.unique(classes[keep])) < 2:
        raise MedsynthError(
            f"the classifier needs labelled images of at least two classes; found classes {sorted(set(classes[keep].tolist()))}"
        )
    x = torch.as_tensor(np.asarray(images[keep], dtype=np.float32))
    y = torch.as_tensor(classes[keep])
    torch.manual_seed(seed)
    network = build_classifier(spatial_dims, x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
        batch = x[index]
        for axis in range(2, 2 + spatial_dims):
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, *[1] * (batch.ndim - 1)), batch.flip(axis), batch)
        loss = torch.nn.functional.cross_entropy(network(batch.to(device)), y[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    network.eval().requires_grad_(False)
    return TrainedClassifier(network.cpu(), num_classes, steps, seed)
