"""Fault injection for the resume tests: a callback that kills its own process with SIGKILL at
a chosen moment, as a crash, the kernel's OOM killer or a lost node would; one that makes a run
diverge at a chosen step.

Added to a run from the command line:
``+callbacks.fault._target_=tests.faults.KillAt +callbacks.fault.moment=save +callbacks.fault.step=10``
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """SIGKILL at ``step``: after that training step (``train``), in the middle of the validation
    that follows it (``validate``), or half-way through writing a checkpoint (``save``); or the
    polite signals a user or a cluster sends (``sigint``, ``sigterm``; ``sigusr1``: SLURM's
    warning before a time limit)."""

    def __init__(self, moment: str, step: int) -> None:
        assert moment in ("train", "validate", "save", "sigint", "sigterm", "sigusr1"), moment
        self.moment = moment
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.moment == "train" and trainer.global_step == self.step:
            _die()
        if self.moment in ("sigint", "sigterm", "sigusr1") and trainer.global_step == self.step:
            os.kill(os.getpid(), {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM,
                                  "sigusr1": signal.SIGUSR1}[self.moment])
        if self.moment == "save" and trainer.global_step == self.step:
            real_save = torch.save

            def half_then_die(obj: Any, f: Any, *a: Any, **k: Any) -> None:
                real_save(obj, f, *a, **k)
                if hasattr(f, "truncate"):  # leave a truncated file, as a kill mid-write would
                    f.flush()
                    f.truncate(max(1, f.tell() // 2))
                    f.flush()
                _die()

            torch.save = half_then_die

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.moment == "validate" and trainer.global_step == self.step and \
                not trainer.sanity_checking:
            _die()


class NanAt(L.Callback):
    """Turns every weight into NaN after training step ``step``: a run that diverges at a known
    moment, after its first checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))
