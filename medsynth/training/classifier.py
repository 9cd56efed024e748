"""Training the small classifier of :mod:`medsynth.metrics.classifier` (the check that a class-conditional
model makes the class it was asked for, and the classification task of the utility experiment).

Cross-entropy on the labelled real training images, random flips along every spatial axis, AdamW with a
constant learning rate. Run by the one training loop (:func:`medsynth.training.engine.fit`): the batches
are epoch permutations of the images and the flips come from the step's generator, both pure functions of
``(seed, step)``, so the same inputs and seed give bitwise the same weights on the CPU and a run with a
work folder resumes exactly.

Also the two pieces every small evaluation trainer (this one, the feature network, the segmenter)
shares: :func:`small_run` (in memory and silent unless a work folder is given) and :func:`small_group`
(the optimiser they all use).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsynth.errors import MedsynthError
from medsynth.metrics.classifier import TrainedClassifier, build_classifier, random_flips
from medsynth.metrics.features import array_sha256
from medsynth.runtime import DistContext
from medsynth.training.engine import Cadence, Optimised, RunSettings, Trainer, fit

CLASSIFIER_CHECKPOINT_FORMAT = "medsynth-classifier-checkpoint"
WEIGHT_DECAY = 1e-2  # AdamW weight decay of every small evaluation network, so that they all train alike


# ---------------------------------------------------------------------------------------------
# Helpers shared by the small trainers
# ---------------------------------------------------------------------------------------------


def small_run(run: RunSettings | None, *, seed: int, device: torch.device | str) -> RunSettings:
    """The run settings of a small trainer: ``run`` when given, else in memory (no checkpoint) and silent.

    A small network trains in one process on ``device``; a given ``run`` must have the same seed and
    device (a work folder, progress or callbacks are what it adds).

    Raises:
        ValueError: ``run`` has another seed or device, or more than one process.
    """
    if run is None:
        return RunSettings(seed=seed, work_dir=None, dist=DistContext(0, 1, 0, torch.device(device)), progress=None)
    if run.seed != seed or run.dist.device != torch.device(device) or run.dist.world_size != 1:
        raise ValueError(
            f"run has seed {run.seed}, device {run.dist.device} and {run.dist.world_size} process(es); "
            f"this training needs seed {seed}, device {torch.device(device)} and one process"
        )
    return run


def small_group(name: str, module: nn.Module, *, lr: float, steps: int) -> Optimised:
    """Fused AdamW at a constant ``lr`` (no warm-up, no decay: floor 1), weight decay :data:`WEIGHT_DECAY`,
    no gradient clipping and no EMA."""
    return Optimised(name, module, lr=lr, total=steps, lr_key="lr", weight_decay=WEIGHT_DECAY, floor=1.0)


def small_cadence(steps: int, batch_size: int, count: int, run: RunSettings) -> Cadence:
    """``steps`` batches of ``batch_size`` items (at most the ``count`` there are); with a work folder the run
    continues from its checkpoint there."""
    return Cadence(max_steps=steps, batch_size=min(batch_size, count), resume=run.work_dir is not None)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class ClassifierTrainer(Trainer):
    """One step: random flips of the batch, cross-entropy of :func:`build_classifier`'s logits.

    Images without a class (-1, or outside 0..num_classes-1) are left out.

    Raises:
        MedsynthError: fewer than two classes among the labelled images.
    """

    checkpoint_format = CLASSIFIER_CHECKPOINT_FORMAT

    def __init__(
        self,
        images: np.ndarray,
        classes: np.ndarray,
        *,
        spatial_dims: int,
        num_classes: int,
        steps: int,
        batch_size: int,
        lr: float,
        run: RunSettings,
    ) -> None:
        classes = np.asarray(classes, dtype=np.int64)
        keep = (classes >= 0) & (classes < num_classes)
        if len(np.unique(classes[keep])) < 2:
            raise MedsynthError(
                "the classifier needs labelled images of at least two classes; "
                f"found classes {sorted(set(classes[keep].tolist()))}"
            )
        x = np.asarray(images[keep], dtype=np.float32)
        y = classes[keep]
        self.device, self.num_classes, self.steps, self.seed = run.dist.device, num_classes, steps, run.seed
        self.view = {
            "trainer": "classifier",
            "spatial_dims": spatial_dims,
            "num_classes": num_classes,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": WEIGHT_DECAY,
            "seed": run.seed,
            "data_shape": list(x.shape),
            "images_sha256": array_sha256(x),
            "classes_sha256": array_sha256(y),
        }
        self.dataset_size = len(x)
        self.cadence = small_cadence(steps, batch_size, len(x), run)
        self.images = torch.as_tensor(x).to(self.device)
        self.classes = torch.as_tensor(y).to(self.device)
        torch.manual_seed(run.seed)  # the initial weights
        self.network = build_classifier(spatial_dims, x.shape[1], num_classes).to(self.device)
        self.groups = [small_group("classifier", self.network, lr=lr, steps=steps)]

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(index[shard], device=self.device)
        (batch,) = random_flips(generator, self.images[rows])
        return {"loss": F.cross_entropy(self.network(batch), self.classes[rows])}

    def trained(self) -> TrainedClassifier:
        """The trained classifier, frozen, on the CPU."""
        self.network.eval().requires_grad_(False)
        return TrainedClassifier(self.network.cpu(), self.num_classes, self.steps, self.seed)


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
    run: RunSettings | None = None,
) -> TrainedClassifier:
    """Train :func:`build_classifier` with cross-entropy on ``images`` (N, C, *spatial) in [-1, 1] and
    their ``classes`` (0..K-1); images without a class (-1) are left out. Random flips along every
    spatial axis augment the small training sets (class findings here do not depend on side).

    Deterministic on CPU: the same inputs and seed give bitwise identical weights.

    Args:
        steps, batch_size, lr: optimiser steps, images per step (at most the labelled images), AdamW's rate.
        seed: seeds the initial weights, the batches and the flips.
        device: where to train; the returned network is on the CPU.
        run: a work folder (``checkpoints/last.pt``; a rerun continues from it), progress, callbacks;
            default: in memory and silent. Its seed and device must be ``seed`` and ``device``.

    Raises:
        MedsynthError: fewer than two classes among the labelled images.
    """
    run = small_run(run, seed=seed, device=device)
    trainer = ClassifierTrainer(
        images,
        classes,
        spatial_dims=spatial_dims,
        num_classes=num_classes,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        run=run,
    )
    fit(trainer, trainer.cadence, run)
    return trainer.trained()
