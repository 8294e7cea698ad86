"""What makes a stopped run resumable exactly: the random states in every checkpoint, and a
graceful stop (Ctrl-C, SIGTERM, SLURM's warning before a time limit, with a requeue)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from galaxy_lightning.callbacks.artifacts import RunArtifacts
from galaxy_lightning.errors import EXIT_INTERRUPTED, EXIT_TERMINATED


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, which keeps tracking the best model when a run resumes
    into a new run directory (every resumed Hydra run gets one).

    Lightning restores only the best checkpoint's path there, not its score, so the first
    validation after the resume is saved as the new best even when it is worse: a run whose best
    validation came before the kill would test other weights than the uninterrupted run. Here the
    score comes back with the path (when that file still exists), so the resumed run keeps the
    earlier best unless it beats it, exactly as the uninterrupted run does. Lightning never
    deletes a file outside this run's directory, so the earlier run's best stays where it is."""

    @property
    def state_key(self) -> str:
        # the key Lightning files this callback's state under in a checkpoint: ModelCheckpoint's,
        # so that checkpoints written before this class (and by plain ModelCheckpoint) resume
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        self.best_model_path = state_dict["best_model_path"]
        score = state_dict.get("best_model_score")
        if self.monitor is not None and score is not None and self.best_model_path \
                and Path(self.best_model_path).is_file():
            self.best_model_score = score
            self.best_k_models = {self.best_model_path: score}
            self.kth_best_model_path, self.kth_value = self.best_model_path, score


class RandomStates(L.Callback):
    """Saves the process's random states (torch, numpy, Python) in every checkpoint and restores
    them on resume, so that dropout and everything else random continue exactly as in the run
    that was interrupted. (The augmentation's own generator is the DataModule's state; the batch
    order is a function of the seed and the epoch.) Stored as tensors and lists, which torch's
    ``weights_only`` loading accepts."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, state, gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                # dropout on a GPU draws from the CUDA generators
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                "python": [version, list(state), gauss]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, state, gauss = state_dict["python"]
        random.setstate((version, tuple(state), gauss))


def slurm_job_id() -> str | None:
    """The SLURM job (``<array job>_<task>`` for an array task) this process runs in, if any."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> str | None:
    """``scontrol requeue <job>``: SLURM puts the job back in the queue, and it starts again with
    the same command (and, under Hydra's submitit launcher, the same run directory)."""
    job = slurm_job_id()
    if job is None:
        return None
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"\ncould not requeue SLURM job {job} ({err}); resume it by hand from "
              "checkpoints/last.ckpt", flush=True)
    return job


class GracefulStop(L.Callback):
    """Ctrl-C (SIGINT), a cluster's pre-emption (SIGTERM) or SLURM's warning before a time limit
    (SIGUSR1) during training: save ``last.ckpt`` between two steps, draw the accuracy curve so
    far, and say in one line how to resume; on SLURM, requeue the job, which then resumes from
    that ``last.ckpt`` by itself (:func:`galaxy_lightning.train.train`).

    Lightning turns SIGTERM into an exception once the current step has completed, and calls
    ``on_exception``, where the checkpoint is saved. Ctrl-C and SIGUSR1 take the same path:
    Python would raise ``KeyboardInterrupt`` anywhere, possibly between an optimizer step and the
    count of completed batches, and Lightning's own SLURM handler saves its checkpoint inside the
    signal handler, wherever the step is; so both are turned into a SIGTERM to this process (a
    second Ctrl-C interrupts at once). The data loader's position, the random states and the
    metric counts are in the checkpoint, so the resumed run continues exactly where this one
    stopped. ``exit_code`` is 130 after Ctrl-C and 143 after SIGTERM, as the shell reports them,
    and 0 after a requeue (the job goes on).

    ``resume_command`` is the command line that resumes the run, given a ``ckpt_path``: the
    training code passes the run's own (:func:`galaxy_lightning.train.run_command`)."""

    def __init__(self, dirpath: str, resume_command: str = "galaxy-train") -> None:
        self.dirpath = Path(dirpath)
        self.resume_command = resume_command
        self.saved: Path | None = None
        self.exit_code = EXIT_TERMINATED
        self.requeue = False
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.exit_code = EXIT_TERMINATED
        self.requeue = False
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        if slurm_job_id() is not None:
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.exit_code = EXIT_INTERRUPTED
        self._restore_handlers()  # a second Ctrl-C interrupts at once
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        self.requeue = True
        self.exit_code = 0
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        if trainer.global_step == 0:
            if trainer.is_global_zero:
                print("\nstopped before the first step: nothing to save; start the run again",
                      flush=True)
            return
        path = self.dirpath / "last.ckpt"
        self._at_next_epoch_start(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        for callback in trainer.callbacks:
            if isinstance(callback, RunArtifacts):
                callback.on_fit_end(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        if self.requeue:
            job = requeue_slurm_job()
            print(f"\nSLURM time limit near at step {trainer.global_step}: saved {path}; "
                  f"requeued job {job}, which resumes from it", flush=True)
        else:
            what = "Ctrl-C" if self.exit_code == EXIT_INTERRUPTED else "SIGTERM"
            print(f"\n{what} at step {trainer.global_step}: saved {path}; resume with: "
                  f"{self.resume_command} ckpt_path={path}", flush=True)

    @staticmethod
    def _at_next_epoch_start(trainer: L.Trainer) -> None:
        """A stop after an epoch's last batch lands once the epoch is counted complete, but before
        the next epoch resets its batch counters; Lightning, resuming from that state, would
        count the next epoch as already 7 batches in and end it after one. Reset the counters as
        the next epoch's start does, so the checkpoint says: epoch done, next one not begun."""
        fit_loop = trainer.fit_loop
        epoch_loop = fit_loop.epoch_loop
        epochs = fit_loop.epoch_progress.current
        if epochs.completed == epochs.ready and \
                epoch_loop.batch_progress.current.completed >= trainer.num_training_batches:
            epoch_loop.batch_progress.reset_on_run()
            epoch_loop.scheduler_progress.reset_on_run()
            epoch_loop.automatic_optimization.optim_progress.reset_on_run()
            epoch_loop.val_loop.batch_progress.total.reset()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
