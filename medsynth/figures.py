"""Figures written as PNG files: sample grids, loss curves, evaluation summaries, denoising comparisons.

Images come in channel-first, normalised to [-1, 1]; volumes are shown as the mid-slices of the three
planes. matplotlib runs headless (Agg) and every figure is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medsynth.io.atomic import atomic_write  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def views(image: np.ndarray) -> list[np.ndarray]:
    """2D: the image; 3D: mid-slices across each axis (shown with the first axis left-right)."""
    array = np.asarray(image)[0]
    if array.ndim == 2:
        return [array.T]
    return [np.take(array, array.shape[axis] // 2, axis=axis).T for axis in (2, 1, 0)]


def _panel(axes_row: list, images: np.ndarray) -> None:
    for ax, image in zip(axes_row, images):
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1, origin="lower", interpolation="nearest")
        ax.set_axis_off()


def sample_grid(
    samples: np.ndarray, path: str | Path, *, real: np.ndarray | None = None, columns: int = 8, title: str = ""
) -> Path:
    """A grid of samples (and, when given, a grid of real images beside them)."""
    sets = [("real", real), ("synthetic", samples)] if real is not None else [("synthetic", samples)]
    per_image = len(views(samples[0]))
    columns = min(columns, max(len(s) for _, s in sets)) if per_image == 1 else 1
    fig, grids = plt.subplots(
        1,
        len(sets),
        figsize=(len(sets) * (2.0 * max(columns, per_image) + 0.3), 0.1 + 2.0 * _rows(sets[-1][1], columns)),
        squeeze=False,
    )
    for ax_outer, (name, images) in zip(grids[0], sets):
        ax_outer.set_axis_off()
        ax_outer.set_title(name)
        rows = _rows(images, columns)
        spec = ax_outer.get_subplotspec().subgridspec(rows, columns * per_image, wspace=0.02, hspace=0.02)
        for i, image in enumerate(images[: rows * columns]):
            r, c = divmod(i, columns)
            axes = [fig.add_subplot(spec[r, c * per_image + k]) for k in range(per_image)]
            _panel(axes, views(image))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _rows(images: np.ndarray, columns: int) -> int:
    return max(1, min(8, (len(images) + columns - 1) // columns))


def loss_curve(history: list[dict[str, float]], path: str | Path) -> Path:
    """Training loss (and validation loss where measured) against step, log scale."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train/loss"] for h in history], label="train loss")
    val = [(h["step"], h["val/loss"]) for h in history if "val/loss" in h and np.isfinite(h["val/loss"])]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (EMA, unweighted)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def evaluation_figure(real: np.ndarray, fake: np.ndarray, metrics: dict[str, float], path: str | Path) -> Path:
    """Intensity histograms of real vs synthetic, and the metric values as bars."""
    fig, (ax_hist, ax_bar) = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.linspace(-1, 1, 65)
    ax_hist.hist(real.ravel(), bins=bins, density=True, alpha=0.5, label="real (held out)")
    ax_hist.hist(fake.ravel(), bins=bins, density=True, alpha=0.5, label="synthetic")
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("normalised intensity")
    ax_hist.set_title("intensity histogram")
    ax_hist.legend()
    names = sorted(metrics)
    ax_bar.barh(range(len(names)), [metrics[n] for n in names])
    ax_bar.set_yticks(range(len(names)), names, fontsize=7)
    ax_bar.set_title("metrics (lower is closer, except diversity)")
    ax_bar.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def psnr_plot(rows: list[dict], path: str | Path, *, level_label: str) -> Path:
    """PSNR (whole image and foreground) against the noise level, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, title in zip(axes, ("psnr", "psnr_fg"), ("whole image", "foreground")):
        for method in methods:
            points = sorted((r["level"], r[key]) for r in rows if r["method"] == method)
            ax.plot(*zip(*points), "o--" if method == "noisy" else "o-", label=method)
        ax.set_xlabel(level_label)
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"PSNR, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def denoise_figure(
    panels: dict[str, np.ndarray],
    clean: np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    window: tuple[float, float] | None = None,
) -> Path:
    """Side by side: noisy / each method / clean (top), and each one's absolute error (bottom).

    Volumes show their middle slice across the last axis; all images share one grey window
    (``window``, e.g. a soft-tissue window in HU; default the clean scan's 1st-99th percentile), all
    error maps one colour scale.
    """

    def plane(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        return (image[..., image.shape[-1] // 2] if image.ndim == 3 else image).T

    names = [*panels, "clean"]
    low, high = window if window is not None else np.percentile(clean, [1, 99])
    error_max = float(np.percentile(np.abs(panels[next(iter(panels))] - clean), 99)) or 1.0
    fig, axes = plt.subplots(2, len(names), figsize=(2.2 * len(names), 5.4), squeeze=False)
    for k, name in enumerate(names):
        image = clean if name == "clean" else panels[name]
        axes[0, k].imshow(plane(image), cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
        axes[0, k].set_title(name, fontsize=9)
        axes[0, k].set_axis_off()
        axes[1, k].set_axis_off()
        if name != "clean":
            axes[1, k].imshow(
                plane(np.abs(image - clean)),
                cmap="magma",
                vmin=0,
                vmax=error_max,
                origin="lower",
                interpolation="nearest",
            )
            axes[1, k].set_title("|error| (one scale)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
