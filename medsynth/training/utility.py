"""The downstream-utility experiment: does adding synthetic scans help a model trained on them?

A small MONAI model is trained, with the same number of steps, batch size and learning rate, on

- ``real``: the real training cases only;
- ``real+synthetic``: all real cases plus the first ``round(ratio * n_real)`` synthetic cases;
- ``synthetic``: the synthetic cases only;

and every model is scored on the same held-out REAL cases. Each regime is repeated over several
seeds (the seed fixes the network initialisation, the batch order and the augmentation), and the
mean ± std over seeds is reported. This is the "train on synthetic, test on real" protocol (TSTR;
Esteban et al. 2017, arXiv:1706.02633) together with its augmentation variant.

Two tasks:

- ``classification``: :func:`medsynth.training.classifier.train_classifier`; accuracy, balanced
  accuracy (mean per-class recall) and, for two classes, ROC AUC of the class-1 probability;
- ``segmentation``: MONAI ``UNet`` trained with ``DiceCELoss`` (:func:`train_segmenter`); MONAI
  ``DiceMetric`` over the foreground labels (mean and per label).

Every model is trained by the one training loop (:func:`medsynth.training.engine.fit`): batches are
epoch permutations of the training cases and the flips come from the step's generator. The scores,
the flat metrics and the figure are in :mod:`medsynth.metrics.utility`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.losses import DiceCELoss

from medsynth.errors import MedsynthError
from medsynth.metrics.classifier import build_classifier, random_flips
from medsynth.metrics.features import array_sha256
from medsynth.metrics.utility import (
    HEADLINE,
    REGIMES,
    TASKS,
    UNET,
    build_segmenter,
    classification_scores,
    segmentation_scores,
)
from medsynth.training.classifier import WEIGHT_DECAY, small_cadence, small_group, small_run, train_classifier
from medsynth.training.engine import RunSettings, Trainer, fit

SEGMENTER_CHECKPOINT_FORMAT = "medsynth-segmenter-checkpoint"


# ---------------------------------------------------------------------------------------------------
# helpers: input checks
# ---------------------------------------------------------------------------------------------------


def _as_images(name: str, images: Any, spatial_dims: int) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 2 + spatial_dims:
        raise MedsynthError(
            f"{name} must have shape (N, C, *spatial) with {spatial_dims} spatial axes; got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise MedsynthError(f"{name} contains NaN or infinite values")
    return array


def _as_targets(name: str, targets: Any, images: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    array = np.asarray(targets)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise MedsynthError(f"{name} contains NaN or infinite values")
        if not np.all(array == np.round(array)):
            raise MedsynthError(f"{name} must hold integer labels; got non-integer values")
    elif array.dtype.kind not in "iub":
        raise MedsynthError(f"{name} must hold integer labels; got dtype {array.dtype}")
    array = array.astype(np.int64)
    if task == "classification":
        if array.shape != (len(images),):
            raise MedsynthError(f"{name} must have shape ({len(images)},) (one class per image); got {array.shape}")
        bad = array[(array < -1) | (array >= num_classes)]
        if bad.size:
            raise MedsynthError(f"{name} has class {int(bad[0])}; allowed: 0..{num_classes - 1}, or -1 for unlabelled")
    else:
        expected = (len(images), 1, *images.shape[2:])
        if array.shape != expected:
            raise MedsynthError(
                f"{name} must be label maps of shape {expected} (matching the images); got {array.shape}"
            )
        bad = array[(array < 0) | (array >= num_classes)]
        if bad.size:
            raise MedsynthError(
                f"{name} has label {int(bad[0])}; allowed: 0..{num_classes - 1} (num_classes={num_classes})"
            )
    return array


def _check_settings(
    task: str,
    spatial_dims: int,
    num_classes: int,
    ratio: float,
    seeds: Sequence[int],
    steps: int,
    batch_size: int,
    lr: float,
) -> list[int]:
    if task not in TASKS:
        raise MedsynthError(f"task must be one of {TASKS}; got {task!r}")
    if spatial_dims not in (2, 3):
        raise MedsynthError(f"spatial_dims must be 2 or 3; got {spatial_dims}")
    if num_classes < 2:
        what = "classes" if task == "classification" else "labels (background included)"
        raise MedsynthError(f"num_classes must be at least 2 {what}; got {num_classes}")
    if not (np.isfinite(ratio) and ratio >= 0):
        raise MedsynthError(f"ratio must be a finite number >= 0; got {ratio}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise MedsynthError("seeds must hold at least one seed (and at least two for a standard deviation)")
    if len(set(seeds)) != len(seeds):
        raise MedsynthError(f"seeds must be distinct; got {seeds}")
    if steps < 1 or batch_size < 1:
        raise MedsynthError(f"steps and batch_size must be >= 1; got steps={steps}, batch_size={batch_size}")
    if not (np.isfinite(lr) and lr > 0):
        raise MedsynthError(f"lr must be a finite number > 0; got {lr}")
    return seeds


def _labelled(
    name: str, images: np.ndarray, targets: np.ndarray, task: str, *, need_two_classes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Classification: drop unlabelled (-1) cases and check what is left; segmentation: unchanged."""
    if task == "segmentation":
        return images, targets
    keep = targets >= 0
    if not keep.any():
        raise MedsynthError(f"{name} has no labelled cases (every class is -1)")
    if need_two_classes and len(np.unique(targets[keep])) < 2:
        raise MedsynthError(
            f"{name} needs labelled cases of at least two classes; found only class {int(targets[keep][0])}"
        )
    return images[keep], targets[keep]


# ---------------------------------------------------------------------------------------------------
# segmentation: MONAI UNet + DiceCELoss, trained the way train_classifier trains
# ---------------------------------------------------------------------------------------------------


class SegmenterTrainer(Trainer):
    """One step: the same random flips of the images and their label maps, ``DiceCELoss(to_onehot_y=True,
    softmax=True)`` of :func:`build_segmenter`'s logits."""

    checkpoint_format = SEGMENTER_CHECKPOINT_FORMAT

    def __init__(
        self,
        images: np.ndarray,
        maps: np.ndarray,
        *,
        spatial_dims: int,
        num_labels: int,
        steps: int,
        batch_size: int,
        lr: float,
        run: RunSettings,
    ) -> None:
        x, y = np.asarray(images, dtype=np.float32), np.asarray(maps, dtype=np.int64)
        self.device = run.dist.device
        self.view = {
            "trainer": "segmenter",
            "spatial_dims": spatial_dims,
            "num_labels": num_labels,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": WEIGHT_DECAY,
            "seed": run.seed,
            "data_shape": list(x.shape),
            "images_sha256": array_sha256(x),
            "maps_sha256": array_sha256(y),
        }
        self.dataset_size = len(x)
        self.cadence = small_cadence(steps, batch_size, len(x), run)
        self.images, self.maps = torch.as_tensor(x).to(self.device), torch.as_tensor(y).to(self.device)
        torch.manual_seed(run.seed)  # the initial weights
        self.network = build_segmenter(spatial_dims, x.shape[1], num_labels).to(self.device)
        self.groups = [small_group("segmenter", self.network, lr=lr, steps=steps)]
        self.loss_function = DiceCELoss(to_onehot_y=True, softmax=True)

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(index[shard], device=self.device)
        batch, target = random_flips(generator, self.images[rows], self.maps[rows])
        return {"loss": self.loss_function(self.network(batch), target)}

    def trained(self) -> torch.nn.Module:
        """The trained UNet, frozen, on the CPU."""
        return self.network.eval().requires_grad_(False).cpu()


def train_segmenter(
    images: np.ndarray,
    maps: np.ndarray,
    *,
    spatial_dims: int,
    num_labels: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    run: RunSettings | None = None,
) -> torch.nn.Module:
    """Train :func:`build_segmenter` with ``DiceCELoss(to_onehot_y=True, softmax=True)``, fused AdamW at a
    constant ``lr`` (weight decay 1e-2) and random flips along every spatial axis (image and map together),
    on images ``(N, C, *spatial)`` and integer label maps ``(N, 1, *spatial)``.

    Deterministic on CPU: the same inputs and seed give bitwise identical weights.

    Args:
        run: a work folder (``checkpoints/last.pt``; a rerun continues from it), progress, callbacks;
            default: in memory and silent. Its seed and device must be ``seed`` and ``device``.
    """
    run = small_run(run, seed=seed, device=device)
    trainer = SegmenterTrainer(
        images,
        maps,
        spatial_dims=spatial_dims,
        num_labels=num_labels,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        run=run,
    )
    fit(trainer, trainer.cadence, run)
    return trainer.trained()


# ---------------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------------


def _train_and_score(
    task: str,
    images: np.ndarray,
    targets: np.ndarray,
    test_images: np.ndarray,
    test_targets: np.ndarray,
    *,
    spatial_dims: int,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str,
) -> dict[str, float]:
    # fork_rng: the experiment seeds torch itself and must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        if task == "classification":
            trained = train_classifier(
                images,
                targets,
                spatial_dims=spatial_dims,
                num_classes=num_classes,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                device=device,
            )
            logits = trained.logits(test_images, batch_size=64, device=device).numpy()
            trained.network.cpu()
            return classification_scores(logits, test_targets, num_classes)
        network = train_segmenter(
            images,
            targets,
            spatial_dims=spatial_dims,
            num_labels=num_classes,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
        )
        return segmentation_scores(network, test_images, test_targets, num_classes, batch_size=32, device=device)


def _n_parameters(network: Callable[[], torch.nn.Module]) -> int:
    with torch.random.fork_rng(devices=[]):  # building a network draws its initial weights
        return sum(p.numel() for p in network().parameters())


def _network_settings(task: str, spatial_dims: int, in_channels: int, num_classes: int) -> dict[str, Any]:
    flips = "random flip along every spatial axis (p=0.5)"
    optimizer = f"AdamW(weight_decay={WEIGHT_DECAY}, constant lr, fused)"
    sampling = "epoch permutations (every case once per epoch)"
    if task == "classification":
        n_parameters = _n_parameters(lambda: build_classifier(spatial_dims, in_channels, num_classes))
        return {
            "name": "medsynth.metrics.classifier.build_classifier",
            "width": 16,
            "parameters": n_parameters,
            "loss": "cross_entropy",
            "optimizer": optimizer,
            "augmentation": flips,
            "sampling": f"{sampling}; unlabelled (-1) cases left out",
        }
    n_parameters = _n_parameters(lambda: build_segmenter(spatial_dims, in_channels, num_classes))
    return {
        "name": "monai.networks.nets.UNet",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
        "parameters": n_parameters,
        "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
        "optimizer": optimizer,
        "augmentation": flips,
        "sampling": sampling,
        "metric": "DiceMetric(include_background=False, reduction='mean_batch') on one-hot argmax",
    }


def _summary(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean over the defined values, and their std with ddof=1; None where undefined (a std needs two
    values). None rather than NaN keeps the result strict JSON and comparable with ``==``."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    mean = float(defined.mean()) if defined.size else None
    std = float(defined.std(ddof=1)) if defined.size >= 2 else None
    return mean, std


def utility_experiment(
    task: Literal["classification", "segmentation"],
    *,
    real_images: Any,
    real_targets: Any,
    synthetic_images: Any,
    synthetic_targets: Any,
    test_images: Any,
    test_targets: Any,
    spatial_dims: int,
    num_classes: int,
    ratio: float,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train on real, real + synthetic and synthetic data, score each on held-out real data, over seeds.

    Args:
        task: ``"classification"`` (targets: one class per image, 0..K-1, -1 = unlabelled and left out)
            or ``"segmentation"`` (targets: integer label maps ``(N, 1, *spatial)``, 0 = background).
        real_images, synthetic_images, test_images: float arrays ``(N, C, *spatial)`` in [-1, 1], with
            the same channels and spatial shape.
        real_targets, synthetic_targets, test_targets: the matching classes or label maps.
        spatial_dims: 2 or 3.
        num_classes: classes (classification) or labels including background (segmentation).
        ratio: ``real+synthetic`` uses every real case plus the first ``round(ratio * n_real)``
            synthetic cases (Python's ``round``; capped at what exists; the count used is recorded).
            For classification, ``n_real`` and the synthetic cases counted are the labelled ones.
        seeds: one run per seed per regime; the seed fixes initialisation and batch order. A standard
            deviation needs at least two seeds (with one it is None).
        steps, batch_size, lr: identical in every regime, so that the comparison is fair.
        device: where to train.
        progress: called with one line after every run.

    Returns:
        ``{"task", "metric", "regimes", "settings", "rows"}`` (and ``"chance"`` for classification: the
        score of always guessing the held-out majority class, and of guessing at random), where
        ``regimes[name] = {"n_real", "n_synthetic", "per_seed": [{"seed", **scores}], "mean", "std"}``
        and ``rows`` is a flat table: one row per regime and seed, then the ``"mean"`` and ``"std"`` rows.

    Raises:
        MedsynthError: a bad setting, an empty synthetic set, no labelled real or held-out case, fewer
            than two classes, labels outside 0..num_classes-1, mismatched shapes, NaN values.
    """
    seeds = _check_settings(task, spatial_dims, num_classes, ratio, seeds, steps, batch_size, lr)
    sets = {}
    for name, images, targets in (
        ("real", real_images, real_targets),
        ("synthetic", synthetic_images, synthetic_targets),
        ("test", test_images, test_targets),
    ):
        x = _as_images(f"{name}_images", images, spatial_dims)
        sets[name] = (x, _as_targets(f"{name}_targets", targets, x, task, num_classes))
    if len(sets["synthetic"][0]) == 0:
        raise MedsynthError("synthetic_images is empty: there is no synthetic data to measure")
    if len(sets["real"][0]) == 0 or len(sets["test"][0]) == 0:
        raise MedsynthError(
            "real and test sets must not be empty; "
            f"got {len(sets['real'][0])} real and {len(sets['test'][0])} test cases"
        )
    shape = sets["real"][0].shape[1:]
    for name in ("synthetic", "test"):
        if sets[name][0].shape[1:] != shape:
            raise MedsynthError(
                f"{name}_images have (C, *spatial) = {sets[name][0].shape[1:]}; the real images have {shape}"
            )
    if task == "segmentation":
        divisor = int(np.prod(UNET["strides"]))
        if any(s % divisor for s in shape[1:]):
            raise MedsynthError(
                f"segmentation needs every spatial side divisible by {divisor} "
                f"(the UNet strides {UNET['strides']}); got {shape[1:]}"
            )
        if not (sets["test"][1] > 0).any():
            raise MedsynthError("test_targets hold no foreground label: Dice on the held-out real set is undefined")
    real_x, real_y = _labelled("real_targets", *sets["real"], task, need_two_classes=True)
    synthetic_x, synthetic_y = _labelled("synthetic_targets", *sets["synthetic"], task, need_two_classes=True)
    test_x, test_y = _labelled("test_targets", *sets["test"], task, need_two_classes=False)

    n_real, n_extra = len(real_x), min(round(ratio * len(real_x)), len(synthetic_x))
    training = {
        "real": (real_x, real_y, n_real, 0),
        "real+synthetic": (
            np.concatenate([real_x, synthetic_x[:n_extra]]),
            np.concatenate([real_y, synthetic_y[:n_extra]]),
            n_real,
            n_extra,
        ),
        "synthetic": (synthetic_x, synthetic_y, 0, len(synthetic_x)),
    }
    regimes: dict[str, dict] = {}
    rows: list[dict] = []
    for regime in REGIMES:
        x, y, used_real, used_synthetic = training[regime]
        per_seed = []
        for seed in seeds:
            scores = _train_and_score(
                task,
                x,
                y,
                test_x,
                test_y,
                spatial_dims=spatial_dims,
                num_classes=num_classes,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                device=device,
            )
            per_seed.append({"seed": seed, **scores})
            if progress is not None:
                progress(
                    f"{task}, {regime} (real {used_real}, synthetic {used_synthetic}), seed {seed}: "
                    f"{HEADLINE[task]} {scores[HEADLINE[task]]:.3f}"
                )
        names = [k for k in per_seed[0] if k != "seed"]
        summaries = {k: _summary([run[k] for run in per_seed]) for k in names}
        regimes[regime] = {
            "n_real": used_real,
            "n_synthetic": used_synthetic,
            "per_seed": per_seed,
            "mean": {k: m for k, (m, _) in summaries.items()},
            "std": {k: s for k, (_, s) in summaries.items()},
        }
        base = {"regime": regime, "n_real": used_real, "n_synthetic": used_synthetic}
        rows += [{**base, **run} for run in per_seed]
        rows += [{**base, "seed": "mean", **regimes[regime]["mean"]}, {**base, "seed": "std", **regimes[regime]["std"]}]

    result = {
        "task": task,
        "metric": HEADLINE[task],
        "regimes": regimes,
        "settings": {
            "task": task,
            "spatial_dims": spatial_dims,
            "num_classes": num_classes,
            "ratio": float(ratio),
            "seeds": seeds,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "image_shape": list(shape),
            "n_test": len(test_x),
            "network": _network_settings(task, spatial_dims, shape[0], num_classes),
            "synthetic_subset": (
                f"first {n_extra} synthetic cases (round({ratio} * {n_real}) capped at {len(synthetic_x)})"
            ),
        },
        "rows": rows,
    }
    if task == "classification":
        counts = np.bincount(test_y, minlength=num_classes)
        result["chance"] = {
            "accuracy": float(counts.max() / counts.sum()),
            "balanced_accuracy": 1.0 / int((counts > 0).sum()),
            "auc": 0.5,
        }
    return result
