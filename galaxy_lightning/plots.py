"""Figures of a run: the tutorial's accuracy curve, the confusion matrix, a reliability diagram and
an image grid.

Pure functions from arrays to matplotlib figures (Agg backend, no display needed); the callers
decide where a figure goes (PNG file, TensorBoard).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def accuracy_curve_figure(train_steps: Sequence[int], train_acc: Sequence[float],
                          val_steps: Sequence[int], val_acc: Sequence[float],
                          best_step: int | None = None) -> Figure:
    """Training and validation accuracy against the iteration, as in the tutorial."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    ax.plot(train_steps, train_acc, label="training", color="tab:blue")
    ax.plot(val_steps, val_acc, label="validation", color="tab:orange")
    if best_step is not None:
        ax.axvline(best_step, color="grey", ls=":", lw=1, label=f"best validation (step {best_step})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy")
    ax.set_title("Training and Validation Accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str],
                            title: str = "Confusion matrix") -> Figure:
    """Row-normalised confusion matrix (true class per row) with the counts written in each cell."""
    matrix = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    rows = matrix.sum(1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = 2.0 + 0.75 * k
    fig, ax = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{frac[i, j]:.2f}\n({matrix[i, j]})", ha="center", va="center",
                    fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = matrix.sum()
    acc = np.trace(matrix) / total if total else float("nan")
    ax.set_title(f"{title} (accuracy {acc:.3f}, {total} images)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return fig


def reliability_diagram_figure(count: Sequence[float], confidence: Sequence[float],
                               correct: Sequence[float], title: str = "Reliability diagram") -> Figure:
    """Accuracy against confidence per equal-width confidence bin (sums per bin as inputs).

    A calibrated classifier lies on the diagonal: of the images it labels with 80% confidence,
    80% are right. Bars below the diagonal mean over-confidence. The gaps, weighted by the
    fraction of images in each bin, sum to the expected calibration error (ECE).
    """
    count, confidence, correct = (np.asarray(a, dtype=float) for a in (count, confidence, correct))
    n_bins = len(count)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    filled = count > 0
    acc = np.divide(correct, count, out=np.zeros(n_bins), where=filled)
    conf = np.divide(confidence, count, out=centers.copy(), where=filled)
    total = count.sum()
    ece = float(np.sum(np.abs(acc - conf) * count) / total) if total else float("nan")
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5.2, 6.0), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / n_bins
    ax.bar(edges[:-1][filled], acc[filled], width=width, align="edge", color="tab:blue",
           edgecolor="white", label="accuracy in bin")
    ax.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=width, align="edge",
           color="tab:red", alpha=0.35, edgecolor="tab:red", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (ECE {ece:.3f}, {int(total)} images)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_hist.bar(edges[:-1], count / total if total else count, width=width, align="edge",
                color="grey", edgecolor="white")
    ax_hist.set_xlabel("confidence (highest class probability)")
    ax_hist.set_ylabel("fraction")
    ax_hist.grid(alpha=0.3)
    return fig


def display_image(image: np.ndarray, display: Mapping[str, Any] | None = None) -> np.ndarray:
    """A uint8 (H, W, C) image as a person should see it: as stored (survey cutouts and FITS
    images are stretched already), or with ``display={"stretch": "asinh"}`` an asinh stretch
    between the 0.5th and 99.8th percentile of the image, for linear 8-bit data whose faint
    structure would otherwise show as black (astropy.visualization)."""
    if not display or display.get("stretch", "linear") == "linear":
        return image
    from astropy.visualization import AsinhStretch, AsymmetricPercentileInterval, ImageNormalize

    norm = ImageNormalize(image.astype(np.float64), interval=AsymmetricPercentileInterval(0.5, 99.8),
                          stretch=AsinhStretch(0.05), clip=True)
    return np.rint(np.ma.getdata(norm(image.astype(np.float64))) * 255).astype(np.uint8)


def display_bands(channels: int) -> tuple[tuple[int, ...], str | None]:
    """Which channels of a C-channel image a figure shows, and a caption saying so.

    1 (grey) and 3 (red, green, blue in stored order) are shown as they are. Survey data can have
    any number of bands, and imshow takes only 1, 3 or 4 (as RGBA, which would make a 4th band
    transparency): 2 bands show the first in grey; 4 or more a composite of the first, middle and
    last band as red, green and blue, the same order as a 3-band image."""
    if channels in (1, 3):
        return tuple(range(channels)), None
    if channels == 2:
        return (0,), "band 1 of 2 shown in grey"
    bands = (0, channels // 2, channels - 1)
    return bands, (f"bands {', '.join(str(b + 1) for b in bands)} of {channels} shown as red, "
                   "green, blue")


def _show(ax: Any, image: np.ndarray, display: Mapping[str, Any] | None) -> None:
    bands, _ = display_bands(image.shape[-1])
    img = display_image(image[..., list(bands)], display)
    if img.shape[-1] == 1:  # grey as stored, not rescaled to each image's own range
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img)


def image_grid_figure(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      per_class: int = 8, display: Mapping[str, Any] | None = None) -> Figure:
    """One row per class with up to ``per_class`` uint8 NHWC example images (any number of
    channels, see :func:`display_bands`)."""
    k = len(class_names)
    fig, axes = plt.subplots(k, per_class, figsize=(1.2 * per_class + 1.6, 1.25 * k),
                             squeeze=False, layout="constrained")
    caption = display_bands(np.shape(images)[-1])[1]
    if caption:
        fig.suptitle(caption, fontsize=8)
    for c in range(k):
        idx = np.flatnonzero(np.asarray(labels) == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_axis_off()
            if j < len(idx):
                _show(ax, images[idx[j]], display)
        axes[c, 0].text(-0.08, 0.5, class_names[c], transform=axes[c, 0].transAxes,
                        ha="right", va="center", fontsize=8)
    return fig


def mistakes_figure(images: np.ndarray, true: Sequence[int], predicted: Sequence[int],
                    confidence: Sequence[float], ids: Sequence[str] | None,
                    class_names: Sequence[str], per_class: int = 8,
                    display: Mapping[str, Any] | None = None) -> Figure:
    """One row per true class: its most confident wrong predictions, each titled with the
    predicted class, the confidence and (when the data has one) the object's id (any number of
    channels, see :func:`display_bands`)."""
    rows = sorted(set(true))
    fig, axes = plt.subplots(max(1, len(rows)), per_class,
                             figsize=(1.5 * per_class + 1.8, 1.75 * max(1, len(rows))),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for r, label in enumerate(rows):
        members = [i for i, t in enumerate(true) if t == label][:per_class]
        for j, i in enumerate(members):
            ax = axes[r, j]
            _show(ax, images[i], display)
            title = f"{class_names[predicted[i]][:14]} {confidence[i]:.2f}"
            if ids is not None:
                title += f"\n{ids[i][:20]}"
            ax.set_title(title, fontsize=6)
        axes[r, 0].text(-0.08, 0.5, f"true: {class_names[label]}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=8)
    caption = display_bands(np.shape(images)[-1])[1]
    fig.suptitle("Most confident test mistakes (predicted class, confidence)"
                 + (f"; {caption}" if caption else ""), fontsize=9)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an RGB uint8 (H, W, 3) array (for TensorBoard images) and close it."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return rgba[..., :3].copy()
