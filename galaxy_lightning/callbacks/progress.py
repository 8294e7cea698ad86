"""What a person watching a run sees, and the benchmark's step timer: Rich's bar on a terminal,
plain lines when the output goes to a file or a pipe."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from galaxy_lightning.files import write_atomic
from galaxy_lightning.models import count_parameters


class LineProgressBar(ProgressBar):
    """Progress as plain lines, for output that goes to a file or a pipe: one line every
    ``every_n_steps`` steps and one after every validation, with the progress-bar metrics."""

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = time.perf_counter()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer: L.Trainer, what: str) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = " ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.progress_bar_metrics.items()))
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        rate = trainer.global_step / max(1e-9, time.perf_counter() - self._start)
        print(f"[{what}] step {trainer.global_step}/{total} epoch {trainer.current_epoch} "
              f"{metrics} ({rate:.1f} steps/s)", flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._line(trainer, "train")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._line(trainer, "validation")


def progress_bar(every_n_steps: int = 100, rich: bool | None = None) -> ProgressBar:
    """Rich's live progress bar on a terminal; :class:`LineProgressBar` when stdout is a file or
    a pipe (a log file, a cluster's job output). ``rich`` true or false chooses either always."""
    if rich if rich is not None else sys.stdout.isatty():
        return RichProgressBar()
    return LineProgressBar(every_n_steps)


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
            "compiled": bool(getattr(pl_module, "_compile", False)),
            "params": count_parameters(pl_module),
        }
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output_file, json.dumps(summary, indent=2))
