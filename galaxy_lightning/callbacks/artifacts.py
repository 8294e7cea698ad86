"""Every figure of a run and ``metrics.json``, to files and to every logger that takes them.

:class:`RunArtifacts` owns the figures: the data examples, the tutorial's accuracy curve, the
confusion matrices, the reliability diagram and the gallery of the most confident test mistakes.
Each is written as a PNG in the run directory and sent to every attached logger that can take an
image (:func:`galaxy_lightning.loggers.log_image`). ``metrics.json`` uses the loggers' names for
every number (``test/acc``, ``val/acc_best``, ...). The accuracy history lives in the callback's state, which
Lightning stores in every checkpoint, so a resumed run still plots the whole curve.
:class:`TensorBoardDashboard` lays out TensorBoard's custom-scalars charts.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

from galaxy_lightning.data.images import describe_stretch
from galaxy_lightning.errors import ConfigError
from galaxy_lightning.files import atomic_file, write_atomic
from galaxy_lightning.loggers import log_artifact, log_image, set_tensorboard_layout, takes_images
from galaxy_lightning.models import count_parameters
from galaxy_lightning.module import metric_slug
from galaxy_lightning.perf import run_environment
from galaxy_lightning.plots import (
    accuracy_curve_figure,
    confusion_matrix_figure,
    display_cell,
    figure_to_array,
    image_grid_figure,
    mistakes_figure,
    png_data_uri,
    question_metrics_figure,
    reliability_diagram_figure,
)


def largest_drop(steps: list[int], accuracies: list[float], after_step: int = 0) -> float | None:
    """The largest fall of validation accuracy from one check to the next, over consecutive
    checks at or after ``after_step`` (the end of the learning-rate warm-up); 0 for a curve that
    never falls, None with fewer than two such checks. A stable run falls by a few test images at
    most; large falls mean that the checkpoint choice is partly noise."""
    pairs = [(a, b) for s, a, b in zip(steps, accuracies, accuracies[1:]) if s >= after_step]
    return max(0.0, *(a - b for a, b in pairs)) if pairs else None


def _number(value: Any) -> float | None:
    """A logged scalar as a JSON number (None when missing or not finite)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class RunArtifacts(L.Callback):
    """Writes ``examples.png``, ``accuracy_curve.png``, ``confusion_matrix.png``,
    ``reliability_diagram.png`` and ``metrics.json``, and logs each figure to the loggers."""

    def __init__(self, output_dir: str, examples_per_class: int = 8,
                 tags: list[str] | None = None, figures: bool = True) -> None:
        self.output_dir = Path(output_dir)
        # figures: false draws none (metrics.json, mistakes.json and the report's data stay):
        # drawing is most of a short run's time, which a search of many trials need not spend
        if not isinstance(figures, bool):
            raise ConfigError(f"figures={figures!r} must be true or false")
        self.figures = figures
        self.examples_per_class = examples_per_class
        self.tags = list(tags or [])
        self.history: dict[str, list[float | None]] = {
            "train_step": [], "train_acc": [], "train_loss": [],
            "val_step": [], "val_acc": [], "val_loss": []}
        self._fit_start: float | None = None
        self.fit_seconds: float | None = None
        self.warmup_steps = 0
        # the most confident test mistakes per true class: (confidence, test row, predicted class)
        self._mistakes: dict[int, list[tuple[float, int, int]]] = {}

    # -- state (saved in checkpoints) --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback states when a fit resumes from a checkpoint (a new process,
        # no history yet): continue the checkpoint's curve. A live history is never replaced: it is
        # at least as long as any checkpoint's (restoring one into the process that trained, as
        # `trainer.test(ckpt_path=...)` would, must not cut the curve back; this package's callers
        # load the tested weights themselves and restore no callback state).
        if not self.history["val_step"]:
            saved = state_dict["history"]
            # checkpoints written before the losses were kept: their curve has no loss points
            self.history = {k: list(saved.get(k) or [None] * len(saved[k.replace("loss", "step")]))
                            for k in self.history}

    # -- figures -----------------------------------------------------------------------------------
    def _figure(self, trainer: L.Trainer, fig: Figure, tag: str, filename: str | None = None,
                dpi: int = 120) -> None:
        """Render ``fig`` once, at ``dpi``: save it as the PNG ``filename`` (if given) and log it
        as ``tag``; closes it. (Drawing a figure is the slow part: it is not drawn again for the
        file; zlib level 3 writes a figure several times faster than the default, ~10% larger.)"""
        if not self.figures:
            plt.close(fig)
            return
        fig.set_dpi(dpi)
        image = figure_to_array(fig)
        if filename is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.output_dir / filename) as f:
                Image.fromarray(image).save(f, format="PNG", compress_level=3)
        log_image(trainer.loggers, tag, image, trainer.global_step)

    # -- hooks -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.warmup_steps = max([int(getattr(c.scheduler, "warmup_steps", 0))
                                 for c in trainer.lr_scheduler_configs], default=0)
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        images, labels = trainer.datamodule.examples(self.examples_per_class)
        stretch = pl_module.spec.stretch
        fig = image_grid_figure(images, labels, pl_module.class_names, self.examples_per_class,
                                display=pl_module.spec.display,
                                title=describe_stretch(stretch) if stretch else None)
        self._figure(trainer, fig, "data/examples", "examples.png", dpi=100)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        step = trainer.global_step
        h = self.history
        if "val/acc" not in metrics or (h["val_step"] and h["val_step"][-1] == step):
            return
        acc = float(metrics["val/acc"])
        improved = not h["val_acc"] or acc > max(h["val_acc"])
        h["val_step"].append(step)
        h["val_acc"].append(acc)
        h["val_loss"].append(_number(metrics.get("val/loss")))
        if "train/acc" in metrics:
            h["train_step"].append(step)
            h["train_acc"].append(float(metrics["train/acc"]))
            h["train_loss"].append(_number(metrics.get("train/loss")))
        summaries = getattr(pl_module, "summaries", {}).get("val")
        # (a figure for the loggers only: not drawn when none of them takes images)
        if improved and trainer.is_global_zero and summaries is not None \
                and takes_images(trainer.loggers):
            fig = confusion_matrix_figure(summaries["confusion_matrix"].cpu().numpy(),
                                          pl_module.class_names, title="val/confusion_matrix_at_best")
            self._figure(trainer, fig, "val/confusion_matrix_at_best")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_start is not None:
            self.fit_seconds = time.perf_counter() - self._fit_start
        if not trainer.is_global_zero or not self.history["val_step"]:
            return
        h = self.history
        fig = accuracy_curve_figure(h["train_step"], h["train_acc"], h["val_step"], h["val_acc"],
                                    self.best_step)
        self._figure(trainer, fig, "curves/accuracy", "accuracy_curve.png")

    @property
    def best_step(self) -> int | None:
        h = self.history
        return int(h["val_step"][int(np.argmax(h["val_acc"]))]) if h["val_acc"] else None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mistakes = {}

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the ``examples_per_class`` most confident mistakes of each true class (one
        process only: with DDP each rank sees a shard, and the rows would not line up)."""
        if not torch.is_tensor(outputs) or trainer.world_size > 1:
            return
        confidence, predicted = outputs.detach().max(1)
        labels = batch[1]
        first = batch_idx * trainer.datamodule.eval_batch_size
        for i in torch.nonzero(predicted != labels).flatten().tolist():
            kept = self._mistakes.setdefault(int(labels[i]), [])
            kept.append((float(confidence[i]), first + i, int(predicted[i])))
            kept.sort(reverse=True)
            del kept[self.examples_per_class:]

    def _mistakes_gallery(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._mistakes or trainer.datamodule is None:
            return
        test = trainer.datamodule.split("test")
        rows = [(label, conf, row, pred) for label, kept in sorted(self._mistakes.items())
                for conf, row, pred in kept]
        index = torch.tensor([r[2] for r in rows])
        ids = test.columns.get("id")
        cells = test.images[index.to(test.images.device)].cpu().numpy()  # (read once, streamed)
        fig = mistakes_figure(cells,
                              [r[0] for r in rows], [r[3] for r in rows], [r[1] for r in rows],
                              [str(ids[r[2]]) for r in rows] if ids is not None else None,
                              pl_module.class_names, self.examples_per_class,
                              display=pl_module.spec.display)
        self._figure(trainer, fig, "test/most_confident_mistakes", "mistakes.png", dpi=100)
        # the same mistakes as data, for the report: each with its identity on the sky and the
        # image as the figure shows it (a small inline PNG)
        records = []
        for (label, conf, row, pred), cell in zip(rows, cells):
            record = {"true": pl_module.class_names[label], "predicted": pl_module.class_names[pred],
                      "confidence": round(float(conf), 4), "test_row": int(row),
                      "image": png_data_uri(display_cell(cell, pl_module.spec.display))}
            for key in ("id", "ra", "dec"):
                column = test.columns.get(key)
                if column is not None:
                    value = column[row]
                    if key == "id":
                        record[key] = str(value)
                    elif np.isfinite(float(value)):  # an unknown position stays unknown (null)
                        record[key] = float(value)
            records.append(record)
        write_atomic(self.output_dir / "mistakes.json", json.dumps(records, indent=1))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summaries = getattr(pl_module, "summaries", {}).get("test")
        if not trainer.is_global_zero or summaries is None:
            return
        self._mistakes_gallery(trainer, pl_module)
        confusion = summaries["confusion_matrix"].cpu().numpy()
        count, confidence, correct = summaries["reliability"].cpu().tolist()
        tta = bool(getattr(pl_module, "tta", False))
        self._figure(trainer, confusion_matrix_figure(confusion, pl_module.class_names,
                                                      title="Test confusion matrix"),
                     "test/confusion_matrix", "confusion_matrix.png")
        scalars = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("test/") and torch.is_tensor(v) and v.numel() == 1}
        title = "Test reliability" + (" (TTA)" if tta else "")
        if "test/ece" in scalars and "test/ece_floor" in scalars:
            # on a few hundred images the ECE of even a perfect model is several hundredths
            title += (f"\nECE {scalars['test/ece']:.3f}; {scalars['test/ece_floor']:.3f} expected of a"
                      f"\nperfectly calibrated model on {int(sum(count))} images")
        self._figure(trainer, reliability_diagram_figure(count, confidence, correct, title=title),
                     "test/reliability_diagram", "reliability_diagram.png")
        tree = getattr(pl_module, "tree", None)
        if tree is not None and "test/tree/mae" in scalars:  # each question against the votes
            slugs = [metric_slug(q.name) for q in tree.questions]
            self._figure(trainer, question_metrics_figure(
                [q.name for q in tree.questions],
                *([scalars.get(f"test/tree/{q}/{m}", float("nan")) for q in slugs]
                  for m in ("mae", "acc_confident", "n_confident", "calibration_error")),
                title=f"Test, per question (mean MAE {scalars.get('test/tree/mae', float('nan')):.3f}, "
                      f"calibration error {scalars.get('test/tree/calibration_error', float('nan')):.3f})"),
                "test/tree_questions", "tree_questions.png")
        h = self.history
        checkpoint = trainer.checkpoint_callback
        metrics = {
            **dict(sorted(scalars.items())),
            "test/confusion_matrix": confusion.tolist(),
            "test/reliability": {"count": count, "confidence": confidence, "correct": correct},
            "val/acc_best": max(h["val_acc"]) if h["val_acc"] else None,
            # stability: the largest fall of val/acc between consecutive checks after warm-up
            "val/acc_largest_drop": largest_drop(h["val_step"], h["val_acc"], self.warmup_steps),
            "warmup_steps": self.warmup_steps,
            # divergence: the highest training loss of this process's fit, and the first step at
            # which it exploded (far above a uniform guess's; None: never)
            "train/loss_peak": getattr(pl_module, "loss_peak", None),
            "train/exploding_at_step": getattr(pl_module, "exploding_at_step", None),
            "best_step": self.best_step,
            "global_step": trainer.global_step,
            "class_names": list(pl_module.class_names),
            "tags": self.tags,
            "tta": tta,
            "calibrated": bool(getattr(pl_module, "calibrated", False)),
            # wall time of this process's fit (validation and checkpoints included; a resumed
            # run counts only its own part)
            "fit_seconds": self.fit_seconds,
            "params": count_parameters(pl_module),
            # the checkpoint whose weights were tested, as the module records it (the caller
            # loaded them: train.py, galaxy-evaluate); else the fit's best
            "checkpoint": getattr(pl_module, "weights_from", None) or (
                str(checkpoint.best_model_path) if checkpoint is not None
                and getattr(checkpoint, "best_model_path", "") else None),
            "history": h,
            # for the report: what the model takes, and what it ran on, when
            "input_spec": pl_module.spec.to_dict(),
            "environment": run_environment(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output_dir / "metrics.json", json.dumps(metrics, indent=2))
        log_artifact(trainer.loggers, self.output_dir / "metrics.json")


class TensorBoardDashboard(L.Callback):
    """TensorBoard's custom-scalars layout: training and validation accuracy on one chart, the
    losses on another (the tutorial's plot, live during training), and the learning rate."""

    # The tags are regular expressions that TensorBoard matches from the start of a tag name:
    # anchored, so that "val/acc" does not also draw val/acc_best and every val/acc_class/*.
    LAYOUT = {"galaxy_lightning": {
        "accuracy: training and validation": ["Multiline", ["^train/acc$", "^val/acc$"]],
        "loss: training and validation": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "learning rate": ["Multiline", ["^train/lr$"]],
    }}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            set_tensorboard_layout(trainer.loggers, self.LAYOUT)
