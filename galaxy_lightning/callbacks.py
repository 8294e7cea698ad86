"""Callbacks: every figure of a run and ``metrics.json``; BatchNorm statistics that match the
weights; a step timer.

:class:`RunArtifacts` owns the figures: the data examples, the tutorial's accuracy curve, the
confusion matrices, the reliability diagram and the gallery of the most confident test mistakes.
Each is written as a PNG in the run directory and sent to every attached logger that can take an
image (:func:`log_image`). ``metrics.json`` uses the loggers' names for every number
(``test/acc``, ``val/acc_best``, ...). The accuracy history lives in the callback's state, which
Lightning stores in every checkpoint, so a resumed run still plots the whole curve.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from matplotlib.figure import Figure

from galaxy_lightning.models import count_parameters
from galaxy_lightning.plots import (
    accuracy_curve_figure,
    confusion_matrix_figure,
    figure_to_array,
    image_grid_figure,
    mistakes_figure,
    reliability_diagram_figure,
)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensorboard_image(logger: TensorBoardLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.add_image(tag, image, step, dataformats="HWC")


def _mlflow_image(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    # an artifact per figure and step: MLflow's UI shows them under the run's artifacts
    logger.experiment.log_image(logger.run_id, image, artifact_file=f"figures/{tag}/step_{step:06d}.png")


def _wandb_image(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    import wandb

    logger.experiment.log({tag: wandb.Image(image), "trainer/global_step": step})


def _image_sinks() -> list[tuple[type[Logger], Any]]:
    """How each kind of logger takes an image: (logger class, function(logger, tag, HWC uint8,
    step)). MLflow and W&B are optional extras: their sinks exist when they are installed."""
    sinks: list[tuple[type[Logger], Any]] = [(TensorBoardLogger, _tensorboard_image)]
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    sinks += [(MLFlowLogger, _mlflow_image), (WandbLogger, _wandb_image)]
    return sinks


IMAGE_SINKS = _image_sinks()


def log_artifact(loggers: list[Logger], path: Path) -> None:
    """Attach a file (metrics.json) to the runs of the loggers that keep files."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            logger.experiment.save(str(path), base_path=str(path.parent), policy="now")


def log_image(loggers: list[Logger], tag: str, image: np.ndarray, step: int) -> None:
    """Send an RGB uint8 (H, W, 3) image to every logger that can take one."""
    for logger in loggers:
        for kind, sink in IMAGE_SINKS:
            if isinstance(logger, kind):
                sink(logger, tag, image, step)
                break


def largest_drop(steps: list[int], accuracies: list[float], after_step: int = 0) -> float | None:
    """The largest fall of validation accuracy from one check to the next, over consecutive
    checks at or after ``after_step`` (the end of the learning-rate warm-up); 0 for a curve that
    never falls, None with fewer than two such checks. A stable run falls by a few test images at
    most; large falls mean that the checkpoint choice is partly noise."""
    pairs = [(a, b) for s, a, b in zip(steps, accuracies, accuracies[1:]) if s >= after_step]
    return max(0.0, *(a - b for a, b in pairs)) if pairs else None


class RunArtifacts(L.Callback):
    """Writes ``examples.png``, ``accuracy_curve.png``, ``confusion_matrix.png``,
    ``reliability_diagram.png`` and ``metrics.json``, and logs each figure to the loggers."""

    def __init__(self, output_dir: str, examples_per_class: int = 8,
                 tags: list[str] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.examples_per_class = examples_per_class
        self.tags = list(tags or [])
        self.history: dict[str, list[float]] = {"train_step": [], "train_acc": [],
                                                "val_step": [], "val_acc": []}
        self._fit_start: float | None = None
        self.fit_seconds: float | None = None
        self.warmup_steps = 0
        #: The checkpoint the test evaluates, when the caller knows it (train.py, evaluation);
        #: else the best checkpoint of the fit.
        self.tested_checkpoint: str | None = None
        # the most confident test mistakes per true class: (confidence, test row, predicted class)
        self._mistakes: dict[int, list[tuple[float, int, int]]] = {}

    # -- state (saved in checkpoints) --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resuming in a new process: continue the checkpoint's curve. In the process that trained,
        # `trainer.test(ckpt_path="best")` also restores callback states; the live history is
        # longer than the best checkpoint's and must not be replaced by it.
        if not self.history["val_step"]:
            self.history = {k: list(v) for k, v in state_dict["history"].items()}

    # -- figures -----------------------------------------------------------------------------------
    def _figure(self, trainer: L.Trainer, fig: Figure, tag: str, filename: str | None = None,
                dpi: int = 120) -> None:
        """Save ``fig`` as ``filename`` (if given) and log it as ``tag``; closes it."""
        if filename is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.output_dir / filename, dpi=dpi)
        log_image(trainer.loggers, tag, figure_to_array(fig), trainer.global_step)

    # -- hooks -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.warmup_steps = max([int(getattr(c.scheduler, "warmup_steps", 0))
                                 for c in trainer.lr_scheduler_configs], default=0)
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        images, labels = trainer.datamodule.examples(self.examples_per_class)
        fig = image_grid_figure(images, labels, pl_module.class_names, self.examples_per_class,
                                display=pl_module.spec.display)
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
        if "train/acc" in metrics:
            h["train_step"].append(step)
            h["train_acc"].append(float(metrics["train/acc"]))
        summaries = getattr(pl_module, "summaries", {}).get("val")
        if improved and trainer.is_global_zero and summaries is not None:
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
        fig = mistakes_figure(test.images[index.to(test.images.device)].cpu().numpy(),
                              [r[0] for r in rows], [r[3] for r in rows], [r[1] for r in rows],
                              [str(ids[r[2]]) for r in rows] if ids is not None else None,
                              pl_module.class_names, self.examples_per_class,
                              display=pl_module.spec.display)
        self._figure(trainer, fig, "test/most_confident_mistakes", "mistakes.png", dpi=100)

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
            title += (f"\nECE {scalars['test/ece']:.3f}; {scalars['test/ece_floor']:.3f} expected "
                      f"of a perfectly calibrated model on {int(sum(count))} images")
        self._figure(trainer, reliability_diagram_figure(count, confidence, correct, title=title),
                     "test/reliability_diagram", "reliability_diagram.png")
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
            "checkpoint": self.tested_checkpoint or (
                str(checkpoint.best_model_path) if checkpoint is not None
                and getattr(checkpoint, "best_model_path", "") else None),
            "history": h,
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
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_custom_scalars(self.LAYOUT)


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
    import sys

    if rich if rich is not None else sys.stdout.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar()
    return LineProgressBar(every_n_steps)


class BatchNormStatistics(L.Callback):
    """Before every validation, recompute the BatchNorm running statistics for the weights about
    to be evaluated, from ``images`` training images (``torch.optim.swa_utils.update_bn``: a
    plain average over those batches, in training mode, without gradients).

    Why: BatchNorm evaluates with running statistics, an exponential average over the last ~10
    training batches (momentum 0.1). While the weights still move fast (Adam at a high rate),
    those statistics describe the network of several steps ago, and validation accuracy jumps by
    tens of points between checks although the weights are good (measured on the simulator with
    1,500 training images: up to 18 points between checks with the running statistics, 4.5 with
    recomputed ones; README, "Training on small real data sets"). Recomputed statistics match
    the weights exactly, so validation, checkpoint choice and the test judge the model itself.

    Place it after ``EMAWeightAveraging`` in the callbacks: that one swaps the averaged weights in
    when validation starts, and these statistics must be those of the averaged weights.
    """

    def __init__(self, images: int = 2048, batch_size: int = 256) -> None:
        if not (isinstance(images, int) and isinstance(batch_size, int)) or images < 1 \
                or batch_size < 1:
            from galaxy_lightning.errors import ConfigError

            raise ConfigError(f"images={images} and batch_size={batch_size} must be positive "
                              "integers")
        self.images = images
        self.batch_size = batch_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.callbacks import WeightAveraging

        mine = trainer.callbacks.index(self)
        if any(isinstance(c, WeightAveraging) for c in trainer.callbacks[mine + 1:]):
            from galaxy_lightning.errors import ConfigError

            raise ConfigError("BatchNormStatistics must come after the weight averaging callback "
                              "(the averaged weights are swapped in first, then their statistics "
                              "computed): list bn_statistics after ema")

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.optim.swa_utils import update_bn

        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split"):
            return
        train = datamodule.split("train")
        if len(train) == 0:
            return
        # the same images every time (the first of a fixed permutation): deterministic statistics
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        index = order[: self.images].to(train.images.device)
        images = train.images[index]
        batches = (datamodule.preprocess(images[i:i + self.batch_size].to(pl_module.device))
                   for i in range(0, len(images), self.batch_size))
        was_training = pl_module.training
        update_bn(batches, pl_module)
        pl_module.train(was_training)


class WeightAverage(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging``, with an average that is the current model until it has
    started (``update_starting_at_step``).

    Lightning's callback copies the initial weights when fit begins and swaps that copy in for
    every validation, checkpoint and the end of training, whether or not averaging has begun: a
    validation before the start would judge the random initial weights (and could be checkpointed
    as them), and a run shorter than the start would end with its initial weights. Here, before
    the start, validation judges the current model itself (nothing is swapped), and checkpoints
    and the end of training take the current model as the average: a run whose averaging has not
    started behaves exactly as one without it."""

    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def _follow_current(self, pl_module: L.LightningModule) -> None:
        average = self._average_model
        if average is None or self._started():
            return
        for mine, current in zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                                 itertools.chain(pl_module.parameters(), pl_module.buffers())):
            mine.data.copy_(current.data)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._started()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_swapped", False):
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._follow_current(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow_current(pl_module)
        super().on_train_end(trainer, pl_module)


class RandomStates(L.Callback):
    """Saves the process's random states (torch, numpy, Python) in every checkpoint and restores
    them on resume, so that dropout and everything else random continue exactly as in the run
    that was interrupted. (The augmentation's own generator is the DataModule's state; the batch
    order is a function of the seed and the epoch.) Stored as tensors and lists, which torch's
    ``weights_only`` loading accepts."""

    def state_dict(self) -> dict[str, Any]:
        import random

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, state, gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                # dropout on a GPU draws from the CUDA generators
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                "python": [version, list(state), gauss]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import random

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
    import subprocess

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
    and 0 after a requeue (the job goes on)."""

    def __init__(self, dirpath: str, resume_command: str = "galaxy-train") -> None:
        self.dirpath = Path(dirpath)
        self.resume_command = resume_command
        self.saved: Path | None = None
        self.exit_code = 128 + 15
        self.requeue = False
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal
        import threading

        self.exit_code = 128 + 15
        self.requeue = False
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        if slurm_job_id() is not None:
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        import os
        import signal

        self.exit_code = 128 + 2
        self._restore_handlers()  # a second Ctrl-C interrupts at once
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        import os
        import signal

        self.requeue = True
        self.exit_code = 0
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_handlers(self) -> None:
        import signal

        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

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
            what = "Ctrl-C" if self.exit_code == 130 else "SIGTERM"
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
