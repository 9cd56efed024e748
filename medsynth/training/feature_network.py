"""Training the self-supervised feature network behind FID, precision/recall, feature MMD and the
feature-space memorisation audit (:mod:`medsynth.metrics.features`), on the real training images.

Run by the one training loop (:func:`medsynth.training.engine.fit`): the batches are epoch permutations
of the images and every random draw of a step (slices, crops, degradations, rotations) comes from the
step's generator, both pure functions of ``(seed, step)``; so the same inputs and seed give bitwise the
same weights on the CPU, and a run with a work folder resumes exactly. The objective's pieces (the
network, the degradations and rotations, the losses) live in :mod:`medsynth.metrics.features`.
"""

from __future__ import annotations

import numpy as np
import torch

from medsynth.metrics.features import (
    PLANES,
    FeatureNetwork,
    SelfSupervisedFeatures,
    array_sha256,
    image_tensor,
    pretext_batch,
    pretext_losses,
    random_slices,
    state_sha256,
)
from medsynth.training.classifier import WEIGHT_DECAY, small_cadence, small_group, small_run
from medsynth.training.engine import RunSettings, Trainer, fit

FEATURE_NETWORK_CHECKPOINT_FORMAT = "medsynth-feature-network-checkpoint"


class FeatureNetworkTrainer(Trainer):
    """One step: a batch of images (of volumes: random central-half slices of one plane, the planes in
    turn), cropped square, degraded and rotated at random; the sum of the heads' cross-entropies.

    Raises:
        ValueError: images that are not finite ``(N, C, *spatial)``, no image, no step, or a ``classes``
            of another length.
    """

    checkpoint_format = FEATURE_NETWORK_CHECKPOINT_FORMAT

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        classes: np.ndarray | None,
        *,
        spatial_dims: int,
        steps: int,
        width: int,
        batch_size: int,
        lr: float,
        run: RunSettings,
    ) -> None:
        x = image_tensor("images", images, spatial_dims)
        if len(x) < 1 or steps < 1:
            raise ValueError(
                "training a feature network needs at least one image and one step, "
                f"got {len(x)} images and steps={steps}"
            )
        labels = (
            torch.full((len(x),), -1, dtype=torch.int64)
            if classes is None
            else torch.as_tensor(np.asarray(classes, dtype=np.int64)).reshape(-1)
        )
        if len(labels) != len(x):
            raise ValueError(f"classes has {len(labels)} entries for {len(x)} images")
        known = labels[labels >= 0].unique()
        self.num_classes = int(known.max()) + 1 if len(known) >= 2 else 0
        self.device, self.spatial_dims, self.seed = run.dist.device, spatial_dims, run.seed
        self.settings = {"steps": steps, "seed": run.seed, "width": width, "batch_size": batch_size, "lr": lr}
        self.images_sha256 = array_sha256(x.numpy())
        self.view = {
            "trainer": "feature_network",
            **self.settings,
            "spatial_dims": spatial_dims,
            "weight_decay": WEIGHT_DECAY,
            "data_shape": list(x.shape),
            "images_sha256": self.images_sha256,
            "classes_sha256": array_sha256(labels.numpy()),
        }
        self.dataset_size = len(x)
        self.cadence = small_cadence(steps, batch_size, len(x), run)
        self.images, self.labels = x.to(self.device), labels.to(self.device)
        self.planes = PLANES if spatial_dims == 3 else ("2d",)
        torch.manual_seed(run.seed)  # the initial weights
        self.network = SelfSupervisedFeatures(x.shape[1], width, self.num_classes).to(self.device)
        self.groups = [small_group("features", self.network, lr=lr, steps=steps)]

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        plane = self.planes[step % len(self.planes)]
        rows = torch.as_tensor(index[shard], device=self.device)
        batch = self.images[rows] if plane == "2d" else random_slices(self.images, rows, plane, generator)
        batch, turns, degraded = pretext_batch(batch, generator)
        losses = pretext_losses(self.network, batch, turns, degraded, self.labels[rows])
        loss = losses["rotation"] + losses["degradation"]
        if "class" in losses:
            loss = loss + losses["class"]
        return {"loss": loss, **losses}

    def trained(self) -> FeatureNetwork:
        """The trained network, frozen, on the CPU, with its identity."""
        network = self.network.cpu().eval().requires_grad_(False)
        identity = {
            "kind": "self_trained",
            "objective": "rotation+degradation" + ("+class" if self.num_classes else ""),
            **self.settings,
            "in_channels": int(self.images.shape[1]),
            "num_classes": self.num_classes,
            "spatial_dims": self.spatial_dims,
            "network_spatial_dims": 2,
            "train_images_sha256": self.images_sha256,
            "weights_sha256": state_sha256(network),
            "feature_dim": 4 * self.settings["width"],
        }
        return FeatureNetwork(network, identity)


def train_feature_network(
    images: np.ndarray,
    classes: np.ndarray | None,
    *,
    spatial_dims: int,
    steps: int = 400,
    seed: int = 0,
    width: int = 16,
    batch_size: int = 32,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    run: RunSettings | None = None,
) -> FeatureNetwork:
    """Train a 2D :class:`SelfSupervisedFeatures` on the real training set ``images`` (N, C, *spatial) in [-1, 1].

    Objective (self-supervised, so it needs no labels: a user's folder of scans has none), two tasks
    on every training image, their cross-entropies summed:

    1. Rotation prediction (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting
       Image Rotations"): the image is rotated by k * 90 degrees, k drawn at random, and the network
       predicts k. Telling the orientation of anatomy needs features of its shape, layout and tissue
       boundaries. Rotations rather than flips: anatomy is close to left-right symmetric, so a mirror
       is often undetectable and the task ill-posed. Non-square images and slices are cropped at random
       to a square of their shorter side (a 90-degree rotation must keep the shape); the network is
       fully convolutional and embeds the whole, uncropped image.
    2. Degradation prediction (as in quality-aware self-supervision, e.g. Madhusudana et al. 2022,
       CONTRIQUE): before the rotation the image is left alone, given Gaussian noise or Gaussian blur of
       random strength (:data:`~medsynth.metrics.features.DEGRADATIONS`), and the network says which.
       Residual noise and over-smoothing are how diffusion samples typically fail, and rotation alone
       learns features nearly blind to noise (measured on 32 px brain phantoms, 128 images, 200-400
       steps: noise of std 0.1 raised the rotation-only FID by 1-10 %, against over 100-fold with this
       task). The FID also rises for degradations this task never shows (box blur, 2x down-sampling,
       Rician noise, intensities times 0.9).

    When ``classes`` holds at least two distinct labels (>= 0; -1 = unlabelled), a class head is
    trained too (multi-task, its cross-entropy added) on the labelled images, so the features also
    separate what the user labelled. A volume's class is given to each of its slices, a weak label
    where the finding is local. The objective is recorded in ``identity["objective"]``.

    Volumes (spatial_dims 3) train on 2D slices from the central half of the three planes, in turn
    (see :data:`~medsynth.metrics.features.PLANES`); the network then scores volumes 2.5D.

    Optimiser: fused AdamW at a constant ``lr``, weight decay 1e-2. Deterministic on CPU: the same
    inputs and seed give bitwise identical weights.

    Args:
        images: the real training set.
        classes: one class per image, or None.
        spatial_dims: 2 or 3.
        steps: optimiser steps.
        seed: seeds the initial weights and the drawn batches, slices, crops, degradations and rotations.
        width: channels of the first block (the features have ``4 * width``).
        batch_size: images (slices) per step (at most the number of images).
        lr: AdamW learning rate.
        device: where to train; the returned network is on the CPU.
        run: a work folder (``checkpoints/last.pt``; a rerun continues from it), progress, callbacks;
            default: in memory and silent. Its seed and device must be ``seed`` and ``device``.
    """
    run = small_run(run, seed=seed, device=device)
    trainer = FeatureNetworkTrainer(
        images,
        classes,
        spatial_dims=spatial_dims,
        steps=steps,
        width=width,
        batch_size=batch_size,
        lr=lr,
        run=run,
    )
    fit(trainer, trainer.cadence, run)
    return trainer.trained()
