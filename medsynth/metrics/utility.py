"""Downstream utility of synthetic data: does adding synthetic scans help a model trained on them?

A small MONAI model is trained, with the same number of steps, batch size and learning rate, on

- ``real``: the real training cases only;
- ``real+synthetic``: all real cases plus the first ``round(ratio * n_real)`` synthetic cases;
- ``synthetic``: the synthetic cases only;

and every model is scored on the same held-out REAL cases. Each regime is repeated over several
seeds (the seed fixes the network initialisation and the batch order), and the mean ± std over seeds
is reported. This is the "train on synthetic, test on real" protocol (TSTR; Esteban et al. 2017,
arXiv:1706.02633) together with its augmentation variant.

Two tasks:

- ``classification``: :func:`medsynth.metrics.classifier.train_classifier`; accuracy, balanced
  accuracy (mean per-class recall) and, for two classes, ROC AUC of the class-1 probability;
- ``segmentation``: MONAI ``UNet`` trained with ``DiceCELoss``; MONAI ``DiceMetric`` over the
  foreground labels (mean and per label).

Written by hand: the experiment loop, the rank-formula AUC (scikit-learn is not a dependency) and
the table/figure; networks, losses and Dice come from MONAI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from scipy.stats import rankdata

from medsynth.errors import MedsynthError
from medsynth.figures import _save  # also puts matplotlib in headless (Agg) mode
from medsynth.metrics.classifier import build_classifier, train_classifier

REGIMES = ("real", "real+synthetic", "synthetic")
TASKS = ("classification", "segmentation")
HEADLINE = {"classification": "accuracy", "segmentation": "dice"}

# The segmentation network: small enough for CPU experiments in minutes; sides must divide by 4.
UNET = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}
WEIGHT_DECAY = 1e-2  # the same AdamW weight decay as train_classifier, so both tasks train alike


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
# helpers: scores
# ---------------------------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney U) formula, ties counted half; NaN unless both classes occur."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_scores(logits: np.ndarray, classes: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and, for 2 classes, ROC AUC."""
    predicted = logits.argmax(1)
    present = np.unique(classes)
    out = {
        "accuracy": float(np.mean(predicted == classes)),
        "balanced_accuracy": float(np.mean([np.mean(predicted[classes == k] == k) for k in present])),
    }
    if num_classes == 2 and len(present) == 2:
        out["auc"] = roc_auc(logits[:, 1] - logits[:, 0], classes == 1)  # the logit gap orders like p(class 1)
    return out


@torch.no_grad()
def _logits(
    network: torch.nn.Module, images: np.ndarray, *, batch_size: int, device: torch.device | str
) -> torch.Tensor:
    network.to(device).eval()
    x = torch.as_tensor(images)
    return torch.cat([network(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------------------------------
# segmentation: MONAI UNet + DiceCELoss, trained the way train_classifier trains
# ---------------------------------------------------------------------------------------------------


def build_segmenter(spatial_dims: int, in_channels: int, num_labels: int) -> torch.nn.Module:
    """A small MONAI ``UNet`` (:data:`UNET`) with one output channel per label."""
    return UNet(spatial_dims, in_channels, num_labels, **UNET)


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
) -> torch.nn.Module:
    """Train :func:`build_segmenter` with ``DiceCELoss(to_onehot_y=True, softmax=True)``, AdamW and random
    flips along every spatial axis (image and map together), batches drawn with replacement."""
    x = torch.as_tensor(images)
    y = torch.as_tensor(maps)
    torch.manual_seed(seed)
    network = build_segmenter(spatial_dims, x.shape[1], num_labels).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
        batch, target = x[index], y[index]
        for axis in range(2, 2 + spatial_dims):
            flip = (torch.rand(len(batch), generator=generator) < 0.5).view(-1, *[1] * (batch.ndim - 1))
            batch = torch.where(flip, batch.flip(axis), batch)
            target = torch.where(flip, target.flip(axis), target)
        loss = loss_function(network(batch.to(device)), target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return network.eval().requires_grad_(False).cpu()


def segmentation_scores(
    network: torch.nn.Module,
    images: np.ndarray,
    maps: np.ndarray,
    num_labels: int,
    *,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, float | None]:
    """Mean Dice over the foreground labels and ``dice_label_<k>`` per label (None where a label never
    occurs in ``maps``), from MONAI's ``DiceMetric`` on one-hot argmax predictions."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True)
    with torch.no_grad():
        network.to(device).eval()
        for i in range(0, len(images), batch_size):
            predicted = network(torch.as_tensor(images[i : i + batch_size]).to(device)).argmax(1, keepdim=True).cpu()
            metric(
                one_hot(predicted, num_labels, dim=1),
                one_hot(torch.as_tensor(maps[i : i + batch_size]), num_labels, dim=1),
            )
    dice, cases = metric.aggregate()  # mean_batch reports 0, not NaN, for a label no case holds: count the cases
    network.cpu()
    per_label = [float(d) if n > 0 else None for d, n in zip(dice.tolist(), cases.tolist())]
    out: dict[str, float | None] = {"dice": float(np.mean([d for d in per_label if d is not None]))}
    out.update({f"dice_label_{k}": d for k, d in enumerate(per_label, start=1)})
    return out


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
            logits = _logits(trained.network, test_images, batch_size=64, device=device).numpy()
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
    if task == "classification":
        n_parameters = _n_parameters(lambda: build_classifier(spatial_dims, in_channels, num_classes))
        return {
            "name": "medsynth.metrics.classifier.build_classifier",
            "width": 16,
            "parameters": n_parameters,
            "loss": "cross_entropy",
            "optimizer": f"AdamW(weight_decay={WEIGHT_DECAY})",
            "augmentation": flips,
            "sampling": "uniform with replacement; unlabelled (-1) cases left out",
        }
    n_parameters = _n_parameters(lambda: build_segmenter(spatial_dims, in_channels, num_classes))
    return {
        "name": "monai.networks.nets.UNet",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
        "parameters": n_parameters,
        "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
        "optimizer": f"AdamW(weight_decay={WEIGHT_DECAY})",
        "augmentation": flips,
        "sampling": "uniform with replacement",
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
            f"real and test sets must not be empty; got {len(sets['real'][0])} real and {len(sets['test'][0])} test cases"
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
                f"segmentation needs every spatial side divisible by {divisor} (the UNet strides {UNET['strides']}); got {shape[1:]}"
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
            "synthetic_subset": f"first {n_extra} synthetic cases (round({ratio} * {n_real}) capped at {len(synthetic_x)})",
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


# ---------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------


def metric_key(regime: str) -> str:
    """MLflow metric names allow no ``+``: ``real+synthetic`` -> ``real_plus_synthetic``."""
    return regime.replace("+", "_plus_")


def utility_metrics(result: dict) -> dict[str, float]:
    """Flat metrics for MLflow: ``utility/<regime>/<metric>_mean`` and ``_std``, and
    ``utility/gain/<metric>`` = mean(real+synthetic) - mean(real). Undefined values (a std over one
    seed, the Dice of a label absent from the held-out set) are left out; ``real+synthetic`` is
    written ``real_plus_synthetic`` (MLflow names allow no ``+``)."""
    out: dict[str, float] = {}
    regimes = result["regimes"]
    for regime, summary in regimes.items():
        for name, value in summary["mean"].items():
            out[f"utility/{metric_key(regime)}/{name}_mean"] = value
            out[f"utility/{metric_key(regime)}/{name}_std"] = summary["std"][name]
    for name, value in regimes["real+synthetic"]["mean"].items():
        if value is not None and regimes["real"]["mean"][name] is not None:
            out[f"utility/gain/{name}"] = value - regimes["real"]["mean"][name]
    return {k: float(v) for k, v in out.items() if v is not None}


def utility_figure(result: dict, path: str | Path, *, title: str = "") -> Path:
    """One bar per regime: the headline metric's mean ± std over seeds, each seed's value as a dot
    (and, for classification, the majority-class accuracy as a dashed line)."""
    metric = result["metric"]
    regimes = list(result["regimes"])
    fig, ax = plt.subplots(figsize=(1.6 * len(regimes) + 1.5, 3.6))
    positions = np.arange(len(regimes))
    means = [result["regimes"][r]["mean"][metric] for r in regimes]
    stds = [result["regimes"][r]["std"][metric] or 0.0 for r in regimes]
    ax.bar(
        positions,
        means,
        yerr=stds,
        capsize=6,
        color=["#4c72b0", "#55a868", "#c44e52"][: len(regimes)],
        alpha=0.75,
        width=0.6,
        label=f"mean ± std over {len(result['settings']['seeds'])} seeds",
    )
    for i, regime in enumerate(regimes):
        values = [run[metric] for run in result["regimes"][regime]["per_seed"]]
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.plot(i + jitter, values, "o", color="black", markersize=4, label="one seed" if i == 0 else None)
    if "chance" in result:
        ax.axhline(result["chance"][metric], color="grey", linestyle="--", linewidth=1, label="majority class")
    ax.set_xticks(
        positions,
        [f"{r}\n(real {result['regimes'][r]['n_real']}, synth {result['regimes'][r]['n_synthetic']})" for r in regimes],
    )
    ax.set_ylabel(f"{metric} on held-out real data")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"downstream utility ({result['task']}, {result['settings']['steps']} steps)")
    return _save(fig, path)
