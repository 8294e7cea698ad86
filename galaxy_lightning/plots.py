"""Figures of a run: the tutorial's accuracy curve, the confusion matrix, a reliability diagram and
an image grid.

Pure functions from arrays to matplotlib figures (Agg backend, no display needed); the callers
decide where a figure goes (PNG file, TensorBoard).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402


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


def question_metrics_figure(questions: Sequence[str], mae: Sequence[float],
                            acc_confident: Sequence[float], n_confident: Sequence[float],
                            calibration_error: Sequence[float] | None = None,
                            title: str = "Decision tree, per question") -> Figure:
    """Per question of a Galaxy Zoo tree: the mean absolute error of the predicted vote
    fractions, their calibration error (when given), and the accuracy of the most-voted answer
    on galaxies where the volunteers were confident (with how many there were: a question few
    galaxies reach is measured on few)."""
    y = np.arange(len(questions))[::-1]
    panels = 3 if calibration_error is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 0.42 * len(questions) + 1.4),
                             sharey=True, layout="constrained")
    bars = [(np.asarray(mae, dtype=float), "tab:orange", "vote-fraction MAE (lower is better)")]
    if calibration_error is not None:
        bars.append((np.asarray(calibration_error, dtype=float), "tab:green",
                     "fraction calibration error (lower is better)"))
    for ax, (values, colour, label) in zip(axes, bars):
        ax.barh(y, np.nan_to_num(values), color=colour)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, list(questions), fontsize=8)
    ax_acc = axes[-1]
    acc = np.asarray(acc_confident, dtype=float)
    ax_acc.barh(y, np.nan_to_num(acc), color="tab:blue")
    for yi, a, n in zip(y, acc, n_confident):
        inside = np.nan_to_num(a) > 0.6  # the label inside a long bar, in white
        ax_acc.text(min(np.nan_to_num(a), 0.98), yi, f" {'-' if np.isnan(a) else f'{a:.2f}'} "
                    f"(n={int(n)}) ", va="center", fontsize=7, ha="right" if inside else "left",
                    color="white" if inside else "black")
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("accuracy on confident galaxies")
    ax_acc.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
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


def display_cell(image: np.ndarray, display: Mapping[str, Any] | None) -> np.ndarray:
    """One image as the RGB uint8 a figure shows (grey as stored, not rescaled per image)."""
    bands, _ = display_bands(image.shape[-1])
    img = display_image(image[..., list(bands)], display)
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def _label_inches(labels: Sequence[str], fontsize: float = 8) -> float:
    """Room left of a grid for its row labels (about 0.6 em per character, and a margin)."""
    return 0.2 + 0.6 * fontsize / 72 * max((len(label) for label in labels), default=0)


def _mosaic_figure(cells: Sequence[Sequence[np.ndarray | None]], cell_shape: tuple[int, int],
                   cell_inches: tuple[float, float],
                   label_inches: float) -> tuple[Figure, Any, float, float]:
    """One axes showing every image of a grid as one mosaic (``cells[row][column]``, None for an
    empty cell) on white, with ``label_inches`` for a label left of each row and room for a short
    title above each cell: one image drawn instead of one axes per cell, which matplotlib lays out
    and draws several times slower. Returns the figure, the axes and the cell pitch (x, y)
    in mosaic pixels; cell (r, c) starts at (c * pitch_x, r * pitch_y + title room)."""
    h, w = cell_shape
    rows, cols = len(cells), max(1, max((len(r) for r in cells), default=1))
    width_in, height_in = cell_inches
    pitch_x = w * width_in / (width_in - 0.1)  # 0.1 inch between cells
    pitch_y = h * height_in / (width_in - 0.1)  # the same scale vertically: room for titles
    mosaic = np.full((int(np.ceil(rows * pitch_y)), int(np.ceil(cols * pitch_x)), 3), 255, np.uint8)
    top = pitch_y - h  # above each image: its title
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            if image is not None:
                y, x = int(round(r * pitch_y + top)), int(round(c * pitch_x))
                mosaic[y:y + h, x:x + w] = image
    fig = plt.figure(figsize=(label_inches + cols * width_in, rows * height_in + 0.35))
    ax = fig.add_axes((label_inches / fig.get_figwidth(), 0.0,
                       cols * width_in / fig.get_figwidth(),
                       rows * height_in / fig.get_figheight()))
    ax.imshow(mosaic, extent=(0, mosaic.shape[1], mosaic.shape[0], 0))
    ax.set_axis_off()
    return fig, ax, pitch_x, pitch_y


def image_grid_figure(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      per_class: int = 8, display: Mapping[str, Any] | None = None,
                      title: str | None = None) -> Figure:
    """One row per class with up to ``per_class`` uint8 NHWC example images (any number of
    channels, see :func:`display_bands`); ``title`` (optional) says how the pixels were made,
    e.g. the FITS stretch, so a badly stretched grid names its cause."""
    images, labels = np.asarray(images), np.asarray(labels)
    cells = [[display_cell(images[i], display) for i in np.flatnonzero(labels == c)[:per_class]]
             for c in range(len(class_names))]
    fig, ax, _, pitch_y = _mosaic_figure(cells, images.shape[1:3], (1.2, 1.25),
                                         _label_inches(class_names))
    top = pitch_y - images.shape[1]
    for c, name in enumerate(class_names):
        ax.text(-0.1 * pitch_y, c * pitch_y + top + images.shape[1] / 2, name, ha="right",
                va="center", fontsize=8)
    caption = "; ".join(t for t in (title, display_bands(np.shape(images)[-1])[1]) if t)
    if caption:
        fig.suptitle(caption, fontsize=8)
    return fig


def mistakes_figure(images: np.ndarray, true: Sequence[int], predicted: Sequence[int],
                    confidence: Sequence[float], ids: Sequence[str] | None,
                    class_names: Sequence[str], per_class: int = 8,
                    display: Mapping[str, Any] | None = None) -> Figure:
    """One row per true class: its most confident wrong predictions, each titled with the
    predicted class, the confidence and (when the data has one) the object's id (any number of
    channels, see :func:`display_bands`)."""
    images = np.asarray(images)
    rows = sorted(set(true))
    members = [[i for i, t in enumerate(true) if t == label][:per_class] for label in rows]
    cells = [[display_cell(images[i], display) for i in row] for row in members] or [[]]
    fig, ax, pitch_x, pitch_y = _mosaic_figure(
        cells, images.shape[1:3], (1.5, 1.75), _label_inches([f"true: {class_names[r]}" for r in rows]))
    top = pitch_y - images.shape[1]
    for r, (label, row) in enumerate(zip(rows, members)):
        for c, i in enumerate(row):
            title = f"{class_names[predicted[i]][:14]} {confidence[i]:.2f}"
            if ids is not None:
                title += f"\n{ids[i][:20]}"
            ax.text((c * pitch_x) + images.shape[2] / 2, r * pitch_y + top * 0.9, title,
                    ha="center", va="bottom", fontsize=6)
        ax.text(-0.1 * pitch_y, r * pitch_y + top + images.shape[1] / 2, f"true: {class_names[label]}",
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


def png_data_uri(image: np.ndarray) -> str:
    """An RGB uint8 image as a ``data:image/png;base64,...`` URI, to inline in a page."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
