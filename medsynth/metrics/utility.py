"""Scores and reporting of the downstream-utility experiment: does adding synthetic scans help a model
trained on them?

The experiment itself (:func:`medsynth.training.utility.utility_experiment`) trains a small MONAI model,
with the same number of steps, batch size and learning rate, on

- ``real``: the real training cases only;
- ``real+synthetic``: all real cases plus the first ``round(ratio * n_real)`` synthetic cases;
- ``synthetic``: the synthetic cases only;

and scores every model on the same held-out REAL cases, over several seeds (mean ± std). This is the
"train on synthetic, test on real" protocol (TSTR; Esteban et al. 2017, arXiv:1706.02633) together with
its augmentation variant.

Here are the pieces that do not train:

- ``classification``: accuracy, balanced accuracy (mean per-class recall) and, for two classes, ROC AUC
  of the class-1 probability (:func:`classification_scores`);
- ``segmentation``: the MONAI ``UNet`` (:func:`build_segmenter`) and MONAI ``DiceMetric`` over the
  foreground labels, mean and per label (:func:`segmentation_scores`);
- the flat MLflow metrics (:func:`utility_metrics`) and the bar chart (:func:`utility_figure`) of a result.

Written by hand: the rank-formula AUC (scikit-learn is not a dependency) and the table/figure; networks
and Dice come from MONAI.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from scipy.stats import rankdata

from medsynth.figures import _save  # also puts matplotlib in headless (Agg) mode

REGIMES = ("real", "real+synthetic", "synthetic")
TASKS = ("classification", "segmentation")
HEADLINE = {"classification": "accuracy", "segmentation": "dice"}

# The segmentation network: small enough for CPU experiments in minutes; sides must divide by 4.
UNET = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}


# ---------------------------------------------------------------------------------------------------
# classification: scores
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


# ---------------------------------------------------------------------------------------------------
# segmentation: MONAI UNet and DiceMetric
# ---------------------------------------------------------------------------------------------------


def build_segmenter(spatial_dims: int, in_channels: int, num_labels: int) -> torch.nn.Module:
    """A small MONAI ``UNet`` (:data:`UNET`) with one output channel per label."""
    return UNet(spatial_dims, in_channels, num_labels, **UNET)


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
