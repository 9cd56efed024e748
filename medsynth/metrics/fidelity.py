"""Fidelity of a synthetic image set against held-out real images.

Set-level metrics on tensors of shape ``(N, C, *spatial)`` with intensities in ``[-1, 1]`` (the
project's CT/MRI convention); ``spatial_dims`` is 2 or 3 and the same code serves both.

- :func:`mmd` — MONAI's unbiased maximum mean discrepancy between the two sets.
- :func:`pairwise_ms_ssim` — diversity: mean MS-SSIM over pairs within one set (lower = more diverse),
  with scales and kernel fitted to the image size by :func:`ssim_settings`.
- :func:`class_intensity_distance` — per-tissue-class intensity histogram distances, using the real
  label maps to model each class.
- :func:`evaluate_fidelity` — all of the above as one flat ``{name: float}`` dict for tracking.

Inputs that cannot be compared raise a plain :class:`ValueError`; the calling stage turns it into a
user-facing error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.metrics import MMDMetric, MultiScaleSSIMMetric, SSIMMetric
from scipy.stats import wasserstein_distance

# Intensities are normalised to [-1, 1], so SSIM's data range is 2.
DATA_RANGE = 2.0
# MONAI's MS-SSIM defaults (Wang et al. 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL_SIGMA = 1.5
MS_SSIM_KERNEL = 11
# Window when MONAI's defaults do not fit: ±2σ for σ = 1.5, the smallest that is still Gaussian-shaped.
# One fixed window keeps values comparable across sizes, and costs a quarter of 11 px in 3D (7³ vs 11³ taps).
SMALL_SSIM_KERNEL = 7
# Voxels (pairs × channels × voxels) per MS-SSIM call, to bound memory for large 3D sets.
_SSIM_VOXELS_PER_CALL = 2**22
# Floor on a class's intensity std: phantom classes can be constant, and a zero std would give the
# class a decision region of zero width.
_MIN_CLASS_STD = 1e-2


# --- input checks -----------------------------------------------------------------------------------


def _check_images(name: str, images: torch.Tensor, spatial_dims: int) -> None:
    """Raise ValueError unless ``images`` is a finite ``(N, C, *spatial)`` tensor."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must have shape (N, C, {', '.join('XYZ'[:spatial_dims])}) for spatial_dims={spatial_dims}, "
            f"got shape {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_comparable(real: torch.Tensor, fake: torch.Tensor) -> None:
    """Raise ValueError unless both sets have the same channel count and spatial shape."""
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake channel counts differ: {real.shape[1]} vs {fake.shape[1]}")
    if real.shape[2:] != fake.shape[2:]:
        raise ValueError(f"real and fake spatial shapes differ: {tuple(real.shape[2:])} vs {tuple(fake.shape[2:])}")


# --- maximum mean discrepancy -----------------------------------------------------------------------


def mmd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased MMD² between two image sets, per voxel (Gretton et al. 2012, eq. 3), via MONAI.

    MONAI's :class:`~monai.metrics.MMDMetric` without a ``y_mapping`` uses the linear kernel on the
    flattened images, so its estimate equals ``||mean(real) - mean(fake)||² - tr S_real/m - tr S_fake/n``
    (S the unbiased covariance): it compares the *mean images* and is blind to diversity, which
    :func:`pairwise_ms_ssim` covers. Being unbiased, it is ≈ 0 on average for independent sets from
    the same distribution and can be slightly negative; for the very same set it is ``-2/m`` times the
    mean per-voxel variance (exactly 0 only if all images are equal). Lower is better.

    The value is divided by the number of values per image (C × voxels), so that it reads as a
    squared intensity difference and is comparable across resolutions.

    MONAI needs equal batch sizes. When they differ, the larger set is cut, in its given order, into
    windows as large as the smaller set that together cover it (the last window overlaps the one
    before), and the estimates are averaged — an average of unbiased estimates, so still unbiased.

    Args:
        real: real images ``(m, C, *spatial)``, m >= 2.
        fake: synthetic images ``(n, C, *spatial)``, n >= 2, same ``C`` and spatial shape.

    Returns:
        The per-voxel MMD² estimate.
    """
    if real.ndim < 3 or fake.ndim < 3:
        raise ValueError(f"mmd needs (N, C, *spatial) tensors, got {tuple(real.shape)} and {tuple(fake.shape)}")
    _check_comparable(real, fake)
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"mmd needs at least 2 images per set, got {real.shape[0]} real and {fake.shape[0]} fake")

    # float64: the estimate is a difference of sums of large inner products.
    small, large = real.detach().double(), fake.detach().double()
    if small.shape[0] > large.shape[0]:
        small, large = large, small
    k, n_large = small.shape[0], large.shape[0]
    n_windows = -(-n_large // k)
    starts = np.linspace(0, n_large - k, n_windows).round().astype(int)
    metric = MMDMetric()
    values = [float(metric(small.contiguous(), large[s : s + k].contiguous())) for s in starts]
    return float(np.mean(values)) / small[0].numel()


# --- diversity: pairwise MS-SSIM --------------------------------------------------------------------


def ssim_settings(spatial_shape: tuple[int, ...]) -> dict[str, Any]:
    """Choose the MS-SSIM scales and window that fit an image size.

    MONAI's defaults (5 scales, 11-px window, Wang et al. 2003 weights) are kept when they fit, i.e.
    every side > 160 px. Otherwise the window is 7 px (same σ = 1.5) and the number of scales is the
    largest that fits; the weights are the first (finest) entries of MONAI's defaults, renormalised to
    sum to 1. When not even 2 scales fit, it falls back to single-scale SSIM with the largest odd
    window up to 7 px that fits.

    A setting fits when, after ``scales - 1`` halvings, every side is still at least the window, and
    MONAI's own (differently shaped) size check passes: ``side // (scales - 1)**2 > kernel - 1``.

    Examples (smallest side → scales, window): 200 → 5, 11; 128 → 5, 7; 64 → 4, 7; 48 → 3, 7;
    32 → 3, 7; 16 → 2, 7; 12 → single-scale SSIM, 7.

    Args:
        spatial_shape: the spatial shape of the images (2 or 3 sides). The smallest side decides.

    Returns:
        ``{"metric": "ms_ssim" | "ssim", "scales", "kernel_size", "kernel_sigma", "kernel_type",
        "weights"}``, to build the metric and to record beside its value.
    """
    if len(spatial_shape) not in (2, 3) or min(spatial_shape) < 1:
        raise ValueError(f"spatial_shape must have 2 or 3 positive sides, got {tuple(spatial_shape)}")
    side = min(int(s) for s in spatial_shape)

    def fits(scales: int, kernel: int) -> bool:
        return side // 2 ** (scales - 1) >= kernel and side // (scales - 1) ** 2 > kernel - 1

    n_weights = len(MS_SSIM_WEIGHTS)
    metric, scales, kernel, weights = "ms_ssim", n_weights, MS_SSIM_KERNEL, MS_SSIM_WEIGHTS
    if not fits(n_weights, MS_SSIM_KERNEL):
        kernel = SMALL_SSIM_KERNEL
        scales = next((s for s in range(n_weights, 1, -1) if fits(s, kernel)), 1)
        weights = tuple(round(w / sum(MS_SSIM_WEIGHTS[:scales]), 6) for w in MS_SSIM_WEIGHTS[:scales])
    if scales == 1:
        metric, weights = "ssim", (1.0,)
        kernel = min(SMALL_SSIM_KERNEL, side if side % 2 else side - 1)
        if kernel < 3:
            raise ValueError(f"spatial shape {tuple(spatial_shape)} is too small for SSIM (need sides >= 3)")
    return {
        "metric": metric,
        "scales": scales,
        "kernel_size": kernel,
        "kernel_sigma": SSIM_KERNEL_SIGMA,
        "kernel_type": "gaussian",
        "weights": weights,
    }


def _ssim_metric(settings: dict[str, Any], spatial_dims: int) -> Callable[..., torch.Tensor]:
    """The MONAI metric described by :func:`ssim_settings`."""
    common = {
        "spatial_dims": spatial_dims,
        "data_range": DATA_RANGE,
        "kernel_type": settings["kernel_type"],
        "kernel_sigma": settings["kernel_sigma"],
    }
    if settings["metric"] == "ms_ssim":
        return MultiScaleSSIMMetric(kernel_size=settings["kernel_size"], weights=settings["weights"], **common)
    return SSIMMetric(win_size=settings["kernel_size"], **common)


def pairwise_ms_ssim(images: torch.Tensor, *, spatial_dims: int, max_pairs: int = 256, seed: int = 0) -> float:
    """Mean MS-SSIM over distinct pairs of one image set: a diversity measure (lower = more diverse).

    Compare the value of a synthetic set with that of a real set of the same size and shape; a
    synthetic set well above the real one lacks diversity (mode collapse), one well below is noisier
    or less structured than the real images. Scales and window come from :func:`ssim_settings`
    (single-scale SSIM for very small images); ``data_range`` is 2 for images in ``[-1, 1]``.

    Args:
        images: ``(N, C, *spatial)``, N >= 2.
        spatial_dims: 2 or 3.
        max_pairs: if there are more than this many pairs ``i < j``, a random subset of this size is used.
        seed: seed for that subset.

    Returns:
        The mean over the pairs, in ``[0, 1]`` (MONAI clips negative terms to 0).
    """
    _check_images("images", images, spatial_dims)
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"pairwise_ms_ssim needs at least 2 images, got {n}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    first, second = np.triu_indices(n, k=1)
    if len(first) > max_pairs:
        chosen = np.sort(np.random.default_rng(seed).choice(len(first), size=max_pairs, replace=False))
        first, second = first[chosen], second[chosen]

    metric = _ssim_metric(ssim_settings(tuple(images.shape[2:])), spatial_dims)
    images = images.detach().float()
    per_call = max(1, _SSIM_VOXELS_PER_CALL // images[0].numel())
    values = []
    for start in range(0, len(first), per_call):
        i = torch.as_tensor(first[start : start + per_call], device=images.device)
        j = torch.as_tensor(second[start : start + per_call], device=images.device)
        values.append(metric(y_pred=images[i], y=images[j]).flatten())
    return float(torch.cat(values).double().mean())


# --- per-class intensity distributions --------------------------------------------------------------


def _histograms(values: torch.Tensor, groups: torch.Tensor, n_groups: int, bins: int) -> np.ndarray:
    """Counts ``(n_groups, bins)`` of ``values`` over ``[-1, 1]`` per group; values outside go to the edge bins."""
    index = ((values.clamp(-1.0, 1.0) + 1.0) * (bins / 2.0)).long().clamp_(0, bins - 1)
    counts = torch.bincount(groups * bins + index, minlength=n_groups * bins)
    return counts.reshape(n_groups, bins).numpy().astype(np.float64)


def _hist_w1(u: np.ndarray, v: np.ndarray, centers: np.ndarray) -> float:
    """1-Wasserstein distance between two histograms on the same bins; NaN if either is empty."""
    if u.sum() == 0 or v.sum() == 0:
        return float("nan")
    return float(wasserstein_distance(centers, centers, u_weights=u, v_weights=v))


def _assign_classes(
    values: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, priors: torch.Tensor
) -> torch.Tensor:
    """Index of the class with the largest Gaussian log posterior for every value (1-D QDA)."""
    best_score = torch.full_like(values, -torch.inf)
    best = torch.zeros_like(values, dtype=torch.long)
    for k in range(len(means)):
        # log π_k + log N(x; μ_k, σ_k²), dropping the constant -½ log 2π
        score = priors[k].log() - stds[k].log() - 0.5 * ((values - means[k]) / stds[k]) ** 2
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best[better] = k
    return best


def class_intensity_distance(
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor,
    *,
    class_names: dict[int, str] | None = None,
    bins: int = 64,
) -> dict[str, float]:
    """Per-tissue-class intensity histogram distances between real and synthetic images.

    Synthetic images come without label maps, so the classes are inferred from intensity:

    1. From the real images and label maps, fit each class's intensity mean and std (std floored at
       0.01) and its prior, the class's voxel fraction.
    2. Assign every voxel — of the real *and* of the synthetic images — to the class with the largest
       posterior under a 1-D Gaussian model (quadratic discriminant analysis on intensity).
    3. Per class, the 1-Wasserstein distance between the ``bins``-bin histograms over ``[-1, 1]`` of
       the real and the synthetic voxels assigned to it, and the absolute difference of the two
       assigned voxel fractions.

    Both sets go through the same classifier so that a generator that reproduces the real intensity
    distribution scores 0: comparing the classifier's picks on synthetic images with the true labels of
    real ones would add the classifier's own errors (wherever classes overlap in intensity) to every
    score. Histograms over all voxels are used instead of subsampling: binning is linear in the number
    of voxels, and W1 is resolved to a bin width (2 / bins).

    A class to which no synthetic voxel is assigned gets ``hist_w1`` NaN (its ``fraction_diff`` then
    equals its real fraction) and is left out of ``hist_w1/mean_class``.

    Args:
        real: real images ``(N, 1, *spatial)``.
        real_labels: integer label maps ``(N, 1, *spatial)`` of the real images.
        fake: synthetic images ``(M, 1, *spatial)``.
        class_names: names for the label values, used in the keys; others are called ``class_<k>``.
        bins: histogram bins over ``[-1, 1]``.

    Returns:
        ``{"hist_w1/<class>", "fraction_diff/<class>"}`` for every class in ``real_labels``, plus
        ``"hist_w1/all"`` (all voxels) and ``"hist_w1/mean_class"``.
    """
    # Hand-written: MONAI has no metric for images without labels against labelled ones; this 1-D
    # Gaussian classifier is the smallest model that gives synthetic voxels a class.
    if real.ndim < 3 or fake.ndim != real.ndim:
        raise ValueError(f"real and fake must be (N, C, *spatial), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[1] != 1 or fake.shape[1] != 1:
        raise ValueError(
            "class_intensity_distance needs single-channel images, "
            f"got {real.shape[1]} real and {fake.shape[1]} fake channels"
        )
    if tuple(real_labels.shape) != tuple(real.shape):
        raise ValueError(f"real_labels must have the shape of real {tuple(real.shape)}, got {tuple(real_labels.shape)}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    labels = real_labels.detach().cpu()
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("real_labels must hold integer class values")
    labels = labels.long().flatten()
    real_values = real.detach().cpu().double().flatten()
    fake_values = fake.detach().cpu().double().flatten()
    class_names = class_names or {}

    # 1. class models from the real labels
    label_values, true_class = torch.unique(labels, return_inverse=True)
    n_classes = len(label_values)
    counts = torch.bincount(true_class, minlength=n_classes).double()
    means = torch.bincount(true_class, weights=real_values, minlength=n_classes) / counts
    variances = torch.bincount(true_class, weights=real_values**2, minlength=n_classes) / counts - means**2
    stds = variances.clamp_min(0.0).sqrt().clamp_min(_MIN_CLASS_STD)
    priors = counts / counts.sum()

    # 2. the same classifier on both sets
    real_class = _assign_classes(real_values, means, stds, priors)
    fake_class = _assign_classes(fake_values, means, stds, priors)

    # 3. distances
    centers = -1.0 + (np.arange(bins) + 0.5) * (2.0 / bins)
    real_hist = _histograms(real_values, real_class, n_classes, bins)
    fake_hist = _histograms(fake_values, fake_class, n_classes, bins)
    real_fraction = real_hist.sum(axis=1) / real_values.numel()
    fake_fraction = fake_hist.sum(axis=1) / fake_values.numel()

    result: dict[str, float] = {}
    class_w1 = []
    for k, value in enumerate(label_values.tolist()):
        name = class_names.get(value, f"class_{value}")
        w1 = _hist_w1(real_hist[k], fake_hist[k], centers)
        result[f"hist_w1/{name}"] = w1
        result[f"fraction_diff/{name}"] = float(abs(real_fraction[k] - fake_fraction[k]))
        if not np.isnan(w1):
            class_w1.append(w1)
    result["hist_w1/all"] = _hist_w1(real_hist.sum(axis=0), fake_hist.sum(axis=0), centers)
    result["hist_w1/mean_class"] = float(np.mean(class_w1)) if class_w1 else float("nan")
    return result


# --- everything together ----------------------------------------------------------------------------


def _mmd_entry(real: torch.Tensor, fake: torch.Tensor, *, spatial_dims: int) -> dict[str, float]:
    return {"mmd": mmd(real, fake)}


def _diversity_entry(real: torch.Tensor, fake: torch.Tensor, *, spatial_dims: int) -> dict[str, float]:
    fake_value = pairwise_ms_ssim(fake, spatial_dims=spatial_dims)
    real_value = pairwise_ms_ssim(real, spatial_dims=spatial_dims)
    return {
        "diversity_ms_ssim/fake": fake_value,
        "diversity_ms_ssim/real": real_value,
        "diversity_gap": abs(fake_value - real_value),
    }


SetMetric = Callable[..., dict[str, float]]
# Label-free set metrics, each ``(real, fake, *, spatial_dims) -> {name: value}``; a new one (FID,
# precision/recall) is one function and one entry here.
FIDELITY_METRICS: dict[str, SetMetric] = {
    "mmd": _mmd_entry,
    "diversity": _diversity_entry,
}


def evaluate_fidelity(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    spatial_dims: int,
    real_labels: torch.Tensor | None = None,
    class_names: dict[int, str] | None = None,
    bins: int = 64,
) -> dict[str, float]:
    """All fidelity metrics of a synthetic set against a real one, as one flat dict.

    Keys: ``mmd``, ``diversity_ms_ssim/fake``, ``diversity_ms_ssim/real``, ``diversity_gap`` and, when
    ``real_labels`` is given, the entries of :func:`class_intensity_distance`. Record
    ``ssim_settings(real.shape[2:])`` beside them: the diversity values depend on it.

    Args:
        real: held-out real images ``(N, C, *spatial)`` in ``[-1, 1]``, N >= 2.
        fake: synthetic images ``(M, C, *spatial)`` in ``[-1, 1]``, M >= 2.
        spatial_dims: 2 or 3.
        real_labels: label maps of ``real`` ``(N, 1, *spatial)``; needs single-channel images.
        class_names: label value → name, for the per-class keys.
        bins: histogram bins over [-1, 1] for the per-class intensity distances.

    Returns:
        ``{metric name: value}``.

    Raises:
        ValueError: for non-finite values, wrong ranks, or sets that differ in channels or spatial shape.
    """
    _check_images("real", real, spatial_dims)
    _check_images("fake", fake, spatial_dims)
    _check_comparable(real, fake)
    for name, images in (("real", real), ("fake", fake)):
        if images.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")

    result: dict[str, float] = {}
    for metric in FIDELITY_METRICS.values():
        result.update(metric(real, fake, spatial_dims=spatial_dims))
    if real_labels is not None:
        result.update(class_intensity_distance(real, real_labels, fake, class_names=class_names, bins=bins))
    return result
