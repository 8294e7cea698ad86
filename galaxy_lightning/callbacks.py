"""Run outputs that are files: the tutorial's figures, metrics.json and an image grid of the data.

The LightningModule computes and logs the metrics; this callback turns them into the files a user
opens after a run (and into TensorBoard images). The accuracy history lives in the callback's
state, which Lightning stores in every checkpoint, so a resumed run still plots the whole curve.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from galaxy_lightning.models import count_parameters
from galaxy_lightning.plots import (
    accuracy_curve_figure,
    confusion_matrix_figure,
    figure_to_array,
    image_grid_figure,
    reliability_diagram_figure,
)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunArtifacts(L.Callback):
    """Writes ``accuracy_curve.png``, ``confusion_matrix.png``, ``reliability_diagram.png``,
    ``examples.png`` and ``metrics.json``."""

    def __init__(self, output_dir: str, examples_per_class: int = 8) -> None:
        self.output_dir = Path(output_dir)
        self.examples_per_class = examples_per_class
        self.history: dict[str, list[float]] = {"train_step": [], "train_acc": [],
                                                "val_step": [], "val_acc": []}
        self._fit_start: float | None = None
        self.fit_seconds: float | None = None

    # -- state (saved in checkpoints) --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resuming in a new process: continue the checkpoint's curve. In the process that trained,
        # `trainer.test(ckpt_path="best")` also restores callback states; the live history is
        # longer than the best checkpoint's and must not be replaced by it.
        if not self.history["val_step"]:
            self.history = {k: list(v) for k, v in state_dict["history"].items()}

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        images, labels = trainer.datamodule.examples(self.examples_per_class)
        fig = image_grid_figure(images, labels, pl_module.class_names, self.examples_per_class)
        fig.savefig(self.output_dir / "examples.png", dpi=100)
        self._tensorboard_image(trainer, "data/examples", figure_to_array(fig), 0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        step = trainer.global_step
        if "val/acc" in metrics and (not self.history["val_step"] or self.history["val_step"][-1] != step):
            self.history["val_step"].append(step)
            self.history["val_acc"].append(float(metrics["val/acc"]))
            if "train/acc" in metrics:
                self.history["train_step"].append(step)
                self.history["train_acc"].append(float(metrics["train/acc"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_start is not None:
            self.fit_seconds = time.perf_counter() - self._fit_start
        if not trainer.is_global_zero or not self.history["val_step"]:
            return
        h = self.history
        best = int(h["val_step"][int(np.argmax(h["val_acc"]))])
        fig = accuracy_curve_figure(h["train_step"], h["train_acc"], h["val_step"], h["val_acc"], best)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.output_dir / "accuracy_curve.png", dpi=120)
        self._tensorboard_image(trainer, "curves/accuracy", figure_to_array(fig), trainer.global_step)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = getattr(pl_module, "test_report", None)
        if not trainer.is_global_zero or report is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fig = confusion_matrix_figure(np.array(report["confusion_matrix"]), pl_module.class_names,
                                      title="Test confusion matrix")
        fig.savefig(self.output_dir / "confusion_matrix.png", dpi=120)
        figure_to_array(fig)  # closes it
        bins = report["reliability"]
        fig = reliability_diagram_figure(bins["count"], bins["confidence"], bins["correct"],
                                         title="Test reliability" + (" (TTA)" if report["tta"] else ""))
        fig.savefig(self.output_dir / "reliability_diagram.png", dpi=120)
        self._tensorboard_image(trainer, "test/reliability_diagram", figure_to_array(fig),
                                trainer.global_step)
        h = self.history
        best_val = max(h["val_acc"]) if h["val_acc"] else None
        checkpoint = trainer.checkpoint_callback
        metrics = {
            "test_acc": report["acc"],
            "test_loss": report["loss"],
            "test_ece": report["ece"],
            "tta": report["tta"],
            "reliability": report["reliability"],
            "test_acc_per_class": report["acc_per_class"],
            "confusion_matrix": report["confusion_matrix"],
            "class_names": list(pl_module.class_names),
            "val_acc_best": best_val,
            "best_step": int(h["val_step"][int(np.argmax(h["val_acc"]))]) if h["val_acc"] else None,
            "global_step": trainer.global_step,
            # wall time of this process's fit (validation and checkpoints included; a resumed
            # run counts only its own part)
            "fit_seconds": self.fit_seconds,
            "params": count_parameters(pl_module),
            "checkpoint": str(checkpoint.best_model_path) if checkpoint is not None
            and getattr(checkpoint, "best_model_path", "") else None,
            "history": h,
        }
        _write_atomic(self.output_dir / "metrics.json", json.dumps(metrics, indent=2))

    @staticmethod
    def _tensorboard_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, image, step, dataformats="HWC")


class StepTimer(L.Callback):
    """Wall-clock timing of training steps, written to a JSON file at the end of training.

    Records when each training step ended (``time.time()``), so a caller that knows when the
    process started gets the time to the first step, and the steady-state cost per step
    (validation, checkpointing and logging included, amortised) after ``warmup_steps``.
    ``python train.py +callbacks.step_timer._target_=galaxy_lightning.callbacks.StepTimer``
    adds it to any run; the benchmark does so.
    """

    def __init__(self, output_file: str, warmup_steps: int = 20) -> None:
        self.output_file = Path(output_file)
        self.warmup_steps = warmup_steps
        self.step_end: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.step_end.append(time.time())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.step_end:
            return
        t = self.step_end
        warm = min(self.warmup_steps, len(t) - 1)
        steady = (t[-1] - t[warm]) / max(1, len(t) - 1 - warm)
        batch = trainer.datamodule.batch_size if trainer.datamodule is not None else None
        summary = {
            "steps": len(t),
            "first_step_end": t[0],
            "ms_per_step": 1e3 * steady,
            "images_per_s": batch / steady if batch and steady > 0 else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "precision": str(trainer.precision),
            "compiled": bool(getattr(pl_module.hparams, "compile", False)),
            "params": count_parameters(pl_module),
        }
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.output_file, json.dumps(summary, indent=2))
