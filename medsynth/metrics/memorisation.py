"""Memorisation audit: does a synthetic scan copy a training patient?

Written by hand: neither MONAI nor any other library the project keeps has a nearest-neighbour copy
audit with patient grouping, so the search, the ratio and the figure live here.

For every synthetic scan ``s`` the audit finds its nearest training scan ``t*`` and compares the
distance with how close real patients come to each other near ``t*``::

    ratio(s) = d(s, t*) / r(t*),    r(t) = min over training scans u of ANOTHER group of d(t, u)

``r`` is measured between *different* groups (patients / cases): several 2D slices of one case are
near-identical, and letting them be each other's neighbours would make every ``r`` tiny and every
ratio large. Reading the ratio:

- ``≈ 0`` — ``s`` is a copy of ``t*`` (up to noise): far closer to it than any other patient comes
  (the test suite measures 0.01 - 0.02 for copies with 0.005 RMS noise);
- ``≈ 0.6 - 1.5``, median ``≈ 1`` — ``s`` is as far from the training set as a new patient from the
  same distribution (the test suite measures 0.79 - 1.41, median 0.99, on held-out procedural cases);
- ``> 1`` — ``s`` lies off the training data, e.g. a poor sample.

A scan is flagged when its ratio is below ``threshold`` (the config's default is 0.3) in image space
(``rule="image"``, the config's default: feature distances are measured and reported but do not flag),
in any of the measured spaces (``rule="any"``) or in all of them (``rule="all"``). Image space is the
default judge because it separated copies from new scans cleanly where feature space did not: on an
over-fitted model's samples the image ratios were 0.07-0.14 and the feature ratios 0.06-0.63, on a
healthy model's 0.90-1.50 and 0.34-3.6 (``docs/benchmarks.md``). The spaces:

- ``"image"`` — Euclidean distance of the flattened images, divided by :func:`image_distance_scale`
  so that it reads as an RMS intensity difference per voxel (images are in ``[-1, 1]``);
- ``"feature"`` — Euclidean distance of feature vectors ``(N, D)`` computed elsewhere (a feature
  network); optional. The ratio is scale-free, so the features need no normalisation.

- :func:`nearest` — chunked, exclusion-aware nearest-neighbour search in float64.
- :func:`memorisation_audit` — the audit, as an :class:`AuditResult`.
- :func:`audit_figure` — the closest (synthetic, training) pairs as a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import numpy as np

from medsynth.figures import _panel, _save, views

# Float64 values held per block of rows in :func:`nearest` (64 MiB): 200 volumes of 64³ are searched
# 32 rows at a time instead of being converted to float64 at once.
_VALUES_PER_BLOCK = 2**23
SPACES: tuple[str, ...] = ("image", "feature")
RULES: tuple[str, ...] = ("image", "any", "all")


# --- nearest neighbours -----------------------------------------------------------------------------


def _rows(name: str, array: Any) -> np.ndarray:
    """``array`` as ``(N, values)`` rows, a view where possible (no float64 copy of the whole set)."""
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...), got shape {array.shape}")
    return array.reshape(array.shape[0], -1)


def _group_codes(groups: Sequence[Any] | np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray([str(g) for g in groups])
    if len(labels) != n:
        raise ValueError(f"{name} must have one entry per scan ({n}), got {len(labels)}")
    return labels


def nearest(
    queries: np.ndarray,
    references: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    query_groups: Sequence[Any] | np.ndarray | None = None,
    reference_groups: Sequence[Any] | np.ndarray | None = None,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference of every query by Euclidean distance over all values (channels × voxels).

    Pairs can be ruled out by a boolean ``(M, N)`` mask ``exclude`` and/or, more cheaply, by groups:
    a query is never matched to a reference of its own group (``query_groups[i] ==
    reference_groups[j]``). Both may be given; a pair is excluded if either says so.

    The search runs over blocks of ``chunk`` query rows × ``chunk`` reference rows, each converted to
    float64 only when used, so large 3D sets fit in memory. Squared distances in a block come from
    ``|q|² + |r|² - 2 q·r`` (one matrix product); the distance to the chosen neighbour is then
    recomputed directly as ``|q - r|`` so that near-copies are not lost to cancellation. Ties go to
    the lowest reference index.

    Args:
        queries: ``(M, ...)`` arrays, flattened per row.
        references: ``(N, ...)`` arrays with the same number of values per row.
        exclude: boolean ``(M, N)``, True where the pair (query i, reference j) is not allowed.
        query_groups: a group id per query; needs ``reference_groups``.
        reference_groups: a group id per reference; needs ``query_groups``.
        chunk: rows per block; default: as many as fit in 64 MiB of float64 (at least 1).

    Returns:
        ``(index, distance)``, each ``(M,)``: the nearest allowed reference and its Euclidean distance
        (not scaled; see :func:`image_distance_scale`).

    Raises:
        ValueError: for mismatched shapes, non-finite values, or a query whose every pair is excluded.
    """
    q, r = _rows("queries", queries), _rows("references", references)
    m, n = q.shape[0], r.shape[0]
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references differ in values per row: {q.shape[1]} vs {r.shape[1]}")
    if n == 0:
        raise ValueError("references is empty")
    for name, rows in (("queries", q), ("references", r)):
        if not np.isfinite(rows).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if exclude is not None:
        exclude = np.asarray(exclude)
        if exclude.dtype != bool or exclude.shape != (m, n):
            raise ValueError(f"exclude must be a boolean ({m}, {n}) mask, got {exclude.dtype} {exclude.shape}")
    if (query_groups is None) != (reference_groups is None):
        raise ValueError("query_groups and reference_groups must be given together")
    if query_groups is not None:
        q_groups = _group_codes(query_groups, m, "query_groups")
        r_groups = _group_codes(reference_groups, n, "reference_groups")
    if chunk is None:
        chunk = max(1, _VALUES_PER_BLOCK // max(1, q.shape[1]))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    best = np.full(m, -1, dtype=np.int64)
    best_sq = np.full(m, np.inf)
    for q0 in range(0, m, chunk):
        q_block = q[q0 : q0 + chunk].astype(np.float64)
        q_norm = np.einsum("ij,ij->i", q_block, q_block)
        for r0 in range(0, n, chunk):
            r_block = r[r0 : r0 + chunk].astype(np.float64)
            r_norm = np.einsum("ij,ij->i", r_block, r_block)
            sq = q_norm[:, None] + r_norm[None, :] - 2.0 * (q_block @ r_block.T)
            np.maximum(sq, 0.0, out=sq)
            if exclude is not None:
                sq[exclude[q0 : q0 + chunk, r0 : r0 + chunk]] = np.inf
            if query_groups is not None:
                sq[q_groups[q0 : q0 + chunk, None] == r_groups[None, r0 : r0 + chunk]] = np.inf
            j = np.argmin(sq, axis=1)
            value = sq[np.arange(len(j)), j]
            # strict <: an earlier block keeps a tie, so ties go to the lowest index
            better = value < best_sq[q0 : q0 + chunk]
            best_sq[q0 : q0 + chunk][better] = value[better]
            best[q0 : q0 + chunk][better] = r0 + j[better]
    if (best < 0).any():
        bad = np.flatnonzero(best < 0)[:5].tolist()
        raise ValueError(f"queries {bad} have no allowed reference (every pair excluded)")

    distance = np.empty(m)
    for q0 in range(0, m, chunk):
        diff = q[q0 : q0 + chunk].astype(np.float64) - r[best[q0 : q0 + chunk]].astype(np.float64)
        distance[q0 : q0 + chunk] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return best, distance


def image_distance_scale(images: np.ndarray) -> float:
    """The divisor that turns an image-space L2 distance into an RMS difference per value.

    ``sqrt(C × voxels)`` of one image of ``(N, C, *spatial)``: ``|a - b|₂ / scale`` is the root mean
    square intensity difference, in the images' own units (``[-1, 1]``, so 0.1 is 5 % of the range),
    and comparable across resolutions and between 2D and 3D.
    """
    shape = np.shape(images)
    if len(shape) < 3:
        raise ValueError(f"images must have shape (N, C, *spatial), got {tuple(shape)}")
    return math.sqrt(math.prod(shape[1:]))


# --- the audit --------------------------------------------------------------------------------------


def _ratio(distance: float, reference: float) -> float:
    """``distance / reference``; a zero reference (duplicated real scans) gives 0 for a copy, else inf."""
    if reference > 0:
        return distance / reference
    return 0.0 if distance == 0 else math.inf


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class AuditResult:
    """Per-scan nearest training scans and ratios of a memorisation audit; see the module docstring.

    ``per_scan[i]`` is ``{"index": i, "<space>": {"nearest", "nearest_group", "distance",
    "reference", "reference_nearest", "reference_group", "ratio"}, ..., "flagged", "flagged_in"}``
    where ``nearest`` is the training index of ``t*``, ``reference`` is ``r(t*)`` and
    ``reference_nearest`` / ``reference_group`` name the training scan (of another group) it was
    measured to. ``flagged_in`` lists the spaces whose ratio is below ``threshold``; ``flagged``
    applies ``rule`` to them. Image distances are RMS per voxel, feature distances Euclidean.
    ``real_nn[space]`` holds ``r(t)`` for every training scan.
    """

    threshold: float
    spaces: tuple[str, ...]
    per_scan: list[dict]
    rule: str = "any"
    real_nn: dict[str, list[float]] = field(default_factory=dict)

    def flagged(self) -> list[int]:
        """Indices of the flagged synthetic scans."""
        return [scan["index"] for scan in self.per_scan if scan["flagged"]]

    def summary(self) -> dict[str, float]:
        """Flat ``{name: float}`` for tracking: flagged count and fraction, and per space the minimum
        and median ratio, the number below threshold and the median within-real nn distance."""
        n = len(self.per_scan)
        flagged = float(len(self.flagged()))
        result = {
            "audit/flagged": flagged,
            "audit/flagged_fraction": flagged / n if n else 0.0,
            "audit/threshold": float(self.threshold),
        }
        for space in self.spaces:
            ratios = np.array([scan[space]["ratio"] for scan in self.per_scan], dtype=np.float64)
            result[f"audit/{space}/min_ratio"] = float(ratios.min()) if n else math.nan
            result[f"audit/{space}/median_ratio"] = float(np.median(ratios)) if n else math.nan
            result[f"audit/{space}/below_threshold"] = float((ratios < self.threshold).sum())
            result[f"audit/{space}/real_nn_median"] = (
                float(np.median(self.real_nn[space])) if self.real_nn.get(space) else math.nan
            )
        return result

    def to_json(self) -> dict:
        """Everything as plain JSON types (non-finite numbers become ``null``)."""
        per_scan = [
            {
                key: ({k: _finite_or_none(v) for k, v in value.items()} if isinstance(value, dict) else value)
                for key, value in scan.items()
            }
            for scan in self.per_scan
        ]
        return {
            "threshold": float(self.threshold),
            "rule": self.rule,
            "spaces": list(self.spaces),
            "distance_units": {"image": "RMS intensity difference per voxel", "feature": "Euclidean"},
            "summary": {k: _finite_or_none(v) for k, v in self.summary().items()},
            "flagged": self.flagged(),
            "per_scan": per_scan,
            "real_nn": {space: [_finite_or_none(v) for v in values] for space, values in self.real_nn.items()},
        }


def _check_images(name: str, images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim not in (4, 5):
        raise ValueError(f"{name} must have shape (N, C, X, Y) or (N, C, X, Y, Z), got shape {images.shape}")
    if images.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return images


def _check_features(name: str, features: Any, n: int, n_name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {features.shape}")
    if features.shape[0] != n:
        raise ValueError(f"{name} must have one row per {n_name} scan ({n}), got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def memorisation_audit(
    synthetic: np.ndarray,
    train: np.ndarray,
    train_groups: Sequence[str],
    *,
    threshold: float,
    synthetic_features: np.ndarray | None = None,
    train_features: np.ndarray | None = None,
    rule: Literal["image", "any", "all"] = "any",
    chunk: int | None = None,
) -> AuditResult:
    """Nearest training scan of every synthetic scan and its distance ratio, in image and feature space.

    ``ratio = d(s, t*) / r(t*)`` with ``t*`` the nearest training scan of ``s`` and ``r(t*)`` the
    distance from ``t*`` to its nearest training scan of another group (see the module docstring for
    the expected range: ≈ 0 for copies, ≈ 1 for new cases).

    Args:
        synthetic: synthetic scans ``(M, C, *spatial)``, 2D or 3D, in ``[-1, 1]``.
        train: training scans ``(N, C, *spatial)``, same ``C`` and spatial shape.
        train_groups: the patient / case id of every training scan; at least 2 distinct ids.
        threshold: flag a scan whose ratio is below this (> 0; the config's default is 0.3).
        synthetic_features: ``(M, D)`` features of the synthetic scans; needs ``train_features``.
        train_features: ``(N, D)`` features of the training scans; needs ``synthetic_features``.
        rule: ``"image"`` — flagged when below threshold in image space; ``"any"`` — in any space;
            ``"all"`` — in all spaces.
        chunk: rows per block of the nearest-neighbour search (:func:`nearest`).

    Returns:
        An :class:`AuditResult` with ``spaces`` ``("image",)`` or ``("image", "feature")``.

    Raises:
        ValueError: shapes differ, NaN/Inf, fewer than 2 training groups, features given for one set
            only or with wrong row counts, ``threshold <= 0``, unknown ``rule``.
    """
    try:
        valid = math.isfinite(float(threshold)) and float(threshold) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    synthetic = _check_images("synthetic", synthetic)
    train = _check_images("train", train)
    if synthetic.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"synthetic and train scans differ in shape: {tuple(synthetic.shape[1:])} vs "
            f"{tuple(train.shape[1:])} (C, *spatial)"
        )
    groups = _group_codes(train_groups, train.shape[0], "train_groups")
    if len(np.unique(groups)) < 2:
        raise ValueError(
            f"train_groups must hold at least 2 distinct groups (patients / cases), got {len(np.unique(groups))}: "
            "the reference distance is measured to another group"
        )
    if (synthetic_features is None) != (train_features is None):
        raise ValueError("synthetic_features and train_features must be given together (or neither)")

    sets = {"image": (synthetic, train, image_distance_scale(train))}
    if synthetic_features is not None:
        s_feat = _check_features("synthetic_features", synthetic_features, synthetic.shape[0], "synthetic")
        t_feat = _check_features("train_features", train_features, train.shape[0], "training")
        if s_feat.shape[1] != t_feat.shape[1]:
            raise ValueError(
                f"synthetic_features and train_features differ in width: {s_feat.shape[1]} vs {t_feat.shape[1]}"
            )
        sets["feature"] = (s_feat, t_feat, 1.0)

    per_space: dict[str, list[dict]] = {}
    real_nn: dict[str, list[float]] = {}
    for space, (queries, references, scale) in sets.items():
        # 1. r(t) for every training scan: nearest training scan of another group
        ref_index, ref_distance = nearest(
            references, references, query_groups=groups, reference_groups=groups, chunk=chunk
        )
        ref_distance = ref_distance / scale
        # 2. t* and d(s, t*) for every synthetic scan
        index, distance = nearest(queries, references, chunk=chunk)
        distance = distance / scale
        # 3. ratio d(s, t*) / r(t*)
        per_space[space] = [
            {
                "nearest": int(j),
                "nearest_group": str(groups[j]),
                "distance": float(d),
                "reference": float(ref_distance[j]),
                "reference_nearest": int(ref_index[j]),
                "reference_group": str(groups[ref_index[j]]),
                "ratio": _ratio(float(d), float(ref_distance[j])),
            }
            for j, d in zip(index, distance, strict=True)
        ]
        real_nn[space] = [float(v) for v in ref_distance]

    spaces = tuple(sets)
    combine = any if rule == "any" else all
    judges = ("image",) if rule == "image" else spaces
    per_scan = []
    for i in range(synthetic.shape[0]):
        scan: dict[str, Any] = {"index": i}
        for space in spaces:
            scan[space] = per_space[space][i]
        scan["flagged_in"] = [space for space in spaces if scan[space]["ratio"] < threshold]
        scan["flagged"] = combine(scan[space]["ratio"] < threshold for space in judges)
        per_scan.append(scan)
    return AuditResult(threshold=float(threshold), spaces=spaces, per_scan=per_scan, rule=rule, real_nn=real_nn)


# --- figure -----------------------------------------------------------------------------------------


def audit_figure(
    result: AuditResult,
    synthetic: np.ndarray,
    train: np.ndarray,
    path: str | Path,
    *,
    top: int = 8,
    space: str = "image",
    pairs_per_row: int = 4,
) -> Path:
    """The ``top`` synthetic scans with the smallest ratio in ``space``, each beside its nearest training scan.

    Titles give the synthetic index, ratio and flag, and the training index, group, distance ``d`` and
    reference distance ``r``.
    Volumes show their central axial slice (``[:, :, Z // 2]`` of RAS ``(X, Y, Z)``, anterior up), the
    first channel only, on the ``[-1, 1]`` grey scale of :func:`medsynth.figures.sample_grid`.

    Args:
        result: the audit of ``synthetic`` against ``train``.
        synthetic: the synthetic scans the audit saw ``(M, C, *spatial)``.
        train: the training scans the audit saw ``(N, C, *spatial)``.
        path: the PNG to write (atomically).
        top: how many pairs to show (fewer if there are fewer scans).
        space: the space whose ratio orders the pairs and whose nearest scan is shown.
        pairs_per_row: pairs side by side in one row.

    Returns:
        The written path.
    """
    if space not in result.spaces:
        raise ValueError(f"space must be one of the audited spaces {result.spaces}, got {space!r}")
    if top < 1 or pairs_per_row < 1:
        raise ValueError(f"top and pairs_per_row must be >= 1, got {top} and {pairs_per_row}")
    synthetic, train = np.asarray(synthetic), np.asarray(train)
    if len(synthetic) != len(result.per_scan):
        raise ValueError(f"synthetic has {len(synthetic)} scans but the audit covers {len(result.per_scan)}")
    needed = max(scan[space]["nearest"] for scan in result.per_scan)
    if len(train) <= needed:
        raise ValueError(f"train has {len(train)} scans but the audit refers to training scan {needed}")

    order = sorted(result.per_scan, key=lambda scan: scan[space]["ratio"])[:top]
    columns = min(pairs_per_row, len(order))
    rows = -(-len(order) // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.0 * 2 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, scan in enumerate(order):
        row, col = divmod(k, columns)
        entry = scan[space]
        ax_syn, ax_train = axes[row, 2 * col], axes[row, 2 * col + 1]
        # views(...)[0]: the 2D image, or a volume's axial slice [:, :, Z // 2], transposed for display
        _panel([ax_syn, ax_train], [views(synthetic[scan["index"]])[0], views(train[entry["nearest"]])[0]])
        flag = "FLAGGED" if scan["flagged"] else "ok"
        ax_syn.set_title(
            f"synthetic {scan['index']}\nratio {entry['ratio']:.3g} {flag}",
            fontsize=8,
            color="red" if scan["flagged"] else "black",
        )
        ax_train.set_title(
            f"train {entry['nearest']} ({entry['nearest_group']})\n"
            f"d {entry['distance']:.3g}, r {entry['reference']:.3g}",
            fontsize=8,
        )
    fig.suptitle(f"closest pairs in {space} space (threshold {result.threshold:g}, rule {result.rule})", fontsize=10)
    fig.tight_layout(h_pad=1.2)
    return _save(fig, path)
