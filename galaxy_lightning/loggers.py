"""Everything that depends on which loggers a run has (TensorBoard, CSV, MLflow, W&B), in one place.

The rest of the package talks to "the loggers" only through these functions: building them from
``conf/logger/`` (an optional one whose package is missing is one line naming the extra), the
run's tags and its config in the hparams views, figures and files, TensorBoard's chart layout,
and closing them at the end of a run. *To add a logger*: a config in ``conf/logger/``; if it
takes images, one function in :data:`IMAGE_SINKS`; if it keeps files, a branch in
:func:`log_artifact`.

MLflow and W&B are optional extras, yet their classes are named here unconditionally: Lightning's
logger classes import without their packages (only constructing one needs it), so every
``isinstance`` below holds whether or not the extras are installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig

from galaxy_lightning.config import construct, resolved, top_level_keys
from galaxy_lightning.errors import ConfigError

#: What the hparams views of the loggers show of a run: every top-level config key (so a new key
#: is recorded without a second list to update) but those that say where, how or what to print,
#: not what was trained ...
NOT_HPARAMS = frozenset({"hydra", "paths", "logger", "callbacks", "perf", "ckpt_path", "train",
                         "test", "print_config", "optimized_metric", "task_name", "experiment",
                         "debug", "hparams_search", "local"})
#: ... against these results.
HPARAM_METRICS = ("val/acc_best", "test/acc", "test/ece")


# -- building ------------------------------------------------------------------------------------
def construct_logger(node: DictConfig, name: str) -> Logger:
    """A logger; an optional one whose package is not installed is one line naming the extra."""
    try:
        return construct(node, f"logger.{name}")
    except ModuleNotFoundError as err:
        raise ConfigError(f"logger.{name}: needs the package {err.name!r}, which is not "
                          "installed; pip install 'galaxy_lightning[loggers]' (or choose another "
                          "logger)") from None


def build_loggers(nodes: Mapping[str, Any] | None, tags: list[str]) -> list[Logger]:
    """The loggers of the ``logger`` config group (none for ``logger=none``), tagged."""
    loggers = [construct_logger(node, name) for name, node in (nodes or {}).items()
               if node is not None]
    tag_loggers(loggers, tags)
    return loggers


def tensorboard_logger(output_dir: Path) -> TensorBoardLogger:
    """The logger of a command that is not a training run (``galaxy-evaluate``): TensorBoard
    events in ``<output_dir>/tensorboard``, where ``conf/logger/tensorboard.yaml`` puts a run's."""
    return TensorBoardLogger(str(output_dir), name="tensorboard", version="",
                             default_hp_metric=False)


# -- what a run is -------------------------------------------------------------------------------
def tag_loggers(loggers: list[Logger], tags: list[str]) -> None:
    """Record the run's tags with every logger: MLflow run tags, W&B tags (its config already
    passes them), a TensorBoard text entry; all of them also get ``tags`` among the hparams."""
    if not tags:
        return
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.tags = {**(logger.tags or {}), **{str(t): "true" for t in tags},
                           "tags": ", ".join(map(str, tags))}
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("tags", ", ".join(map(str, tags)), 0)


def log_run_hyperparameters(trainer: L.Trainer, cfg: DictConfig,
                            metrics: dict[str, float] | None = None) -> None:
    """Record the run's config in every logger's hparams view (each logger flattens the nested
    config itself): at the start of the run, so that a run that is stopped, or that does not
    test, is recorded too; and with ``metrics`` at its end for the loggers that take metrics
    with their hyperparameters (TensorBoard's hparams view), under the names the run logged."""
    params = {k: resolved(cfg.get(k)) for k in sorted(top_level_keys() - NOT_HPARAMS) if k in cfg}
    for logger in trainer.loggers:
        takes_metrics = "metrics" in inspect.signature(logger.log_hyperparams).parameters
        if metrics is None:
            logger.log_hyperparams(params)
        elif takes_metrics:
            results = {k: metrics[k] for k in HPARAM_METRICS if k in metrics}
            logger.log_hyperparams(params, metrics=results, step=trainer.global_step)


# -- figures, files, charts ----------------------------------------------------------------------
def _tensorboard_image(logger: TensorBoardLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.add_image(tag, image, step, dataformats="HWC")


def _mlflow_image(logger: MLFlowLogger, tag: str, image: np.ndarray, step: int) -> None:
    # an artifact per figure and step: MLflow's UI shows them under the run's artifacts
    logger.experiment.log_image(logger.run_id, image, artifact_file=f"figures/{tag}/step_{step:06d}.png")


def _wandb_image(logger: WandbLogger, tag: str, image: np.ndarray, step: int) -> None:
    # deferred: wandb is an optional extra, and heavy; a run with a WandbLogger has it
    import wandb

    logger.experiment.log({tag: wandb.Image(image), "trainer/global_step": step})


#: How each kind of logger takes an image: (logger class, function(logger, tag, HWC uint8, step)).
IMAGE_SINKS: list[tuple[type[Logger], Callable[[Any, str, np.ndarray, int], None]]] = [
    (TensorBoardLogger, _tensorboard_image), (MLFlowLogger, _mlflow_image),
    (WandbLogger, _wandb_image)]


def takes_images(loggers: list[Logger]) -> bool:
    """Whether any of ``loggers`` takes images (a figure only they would see need not be drawn)."""
    return any(isinstance(logger, kind) for logger in loggers for kind, _ in IMAGE_SINKS)


def log_image(loggers: list[Logger], tag: str, image: np.ndarray, step: int) -> None:
    """Send an RGB uint8 (H, W, 3) image to every logger that can take one."""
    for logger in loggers:
        for kind, sink in IMAGE_SINKS:
            if isinstance(logger, kind):
                sink(logger, tag, image, step)
                break


def log_artifact(loggers: list[Logger], path: Path) -> None:
    """Attach a file (metrics.json) to the runs of the loggers that keep files."""
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            logger.experiment.save(str(path), base_path=str(path.parent), policy="now")


def set_tensorboard_layout(loggers: list[Logger], layout: dict[str, Any]) -> None:
    """TensorBoard's custom-scalars layout (charts of several tags) for every TensorBoard logger."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(layout)


# -- the end -------------------------------------------------------------------------------------
def finish_loggers(trainer: L.Trainer) -> None:
    """Close what the loggers keep open, so that their stores are complete when the run returns
    (W&B writes its run file in a background service until the run is finished; each job of a
    sweep is its own W&B run)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
