"""One training run from a composed config: validate, prepare data, fit, test, write outputs.

``galaxy-train`` (and ``python train.py`` in a checkout, ``python -m galaxy_lightning.train``) is
the Hydra entry point :func:`main`; tests call :func:`train` directly with a config from
``hydra.compose``.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from galaxy_lightning import perf
from galaxy_lightning.calibration import calibrate, store_in_checkpoint
from galaxy_lightning.callbacks import GracefulStop
from galaxy_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_resume,
    find_last,
    refuse_resume_of_old_format,
)
from galaxy_lightning.config import CONFIG_PACKAGE, construct, validate_config
from galaxy_lightning.console import print_config_tree
from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.errors import ConfigError, cli_boundary, config_key
from galaxy_lightning.models import count_parameters
from galaxy_lightning.module import GalaxyClassifier

log = logging.getLogger(__name__)

#: What the hparams views of the loggers show of a run: these config groups and keys ...
HPARAM_KEYS = ("seed", "tags", "data", "model", "optimizer", "scheduler", "label_smoothing", "tta",
               "calibrate", "trainer")
#: ... against these results.
HPARAM_METRICS = ("val/acc_best", "test/acc", "test/ece")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _scalars(trainer: L.Trainer) -> dict[str, float]:
    """The trainer's current scalar metrics as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1}


def build(cfg: DictConfig) -> tuple[GalaxyDataModule, GalaxyClassifier, L.Trainer]:
    """The DataModule, the LightningModule (sized from the prepared file's input spec) and the
    Trainer. Cheap objects are built first, so that their own checks refuse a bad value before
    any data is downloaded or simulated."""
    datamodule: GalaxyDataModule = construct(cfg.data, "data")
    callbacks = [construct(c, f"callbacks.{name}")
                 for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    loggers: list[Logger] = [construct(lg, f"logger.{name}")
                             for name, lg in (cfg.get("logger") or {}).items() if lg is not None]
    if not loggers:  # Lightning's LearningRateMonitor refuses to run without a logger to feed
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    tag_loggers(loggers, list(cfg.get("tags") or []))
    try:
        trainer: L.Trainer = construct(cfg.trainer, "trainer", callbacks=callbacks,
                                       logger=loggers or False, plugins=[AtomicCheckpointIO()])
    except (MisconfigurationException, ValueError) as err:  # Lightning's checks of its settings
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"trainer: {str(err).splitlines()[0]}") from None
    with config_key("data"):
        datamodule.prepare_data()
    module = GalaxyClassifier(model=_container(cfg.model), input_spec=datamodule.spec.to_dict(),
                              optimizer=_container(cfg.optimizer),
                              scheduler=_container(cfg.get("scheduler")) or None,
                              label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                              data=_container(cfg.data), compile=bool(cfg.perf.compile))
    module.set_inference(tta=bool(cfg.get("tta", False)))
    return datamodule, module, trainer


def tag_loggers(loggers: list[Logger], tags: list[str]) -> None:
    """Record the run's tags with every logger: MLflow run tags, W&B tags (its config already
    passes them), a TensorBoard text entry; all of them also get ``tags`` among the hparams."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    if not tags:
        return
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            logger.tags = {**(logger.tags or {}), **{str(t): "true" for t in tags},
                           "tags": ", ".join(map(str, tags))}
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("tags", ", ".join(map(str, tags)), 0)


def log_run_hyperparameters(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Record the run's config with its results in every logger's hparams view (each logger
    flattens the nested config itself). Loggers that take metrics with their hyperparameters
    (TensorBoard) get them at the final step, under the names the run logged them."""
    params = {k: _container(cfg.get(k)) for k in HPARAM_KEYS}
    results = {k: metrics[k] for k in HPARAM_METRICS if k in metrics}
    for logger in trainer.loggers:
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(params, metrics=results, step=trainer.global_step)
        else:
            logger.log_hyperparams(params)


def load_weights(module: GalaxyClassifier, checkpoint: str) -> None:
    """The weights the checkpoint was saved with (with weight averaging: the averaged weights,
    which is what Lightning's EMA callback stores under ``state_dict``) and its temperature."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    module.set_inference(calibrated=state.get("galaxy_lightning", {}).get("inference", {})
                         .get("calibrated", False))


def calibrate_checkpoint(trainer: L.Trainer, module: GalaxyClassifier,
                         datamodule: GalaxyDataModule, checkpoint: str) -> float:
    """Fit the temperature of the module's weights (loaded from ``checkpoint``) on the
    validation split, with the run's test-time augmentation, and store it in that file."""
    val = datamodule.split("val")
    temperature = calibrate(module, val.images, val.labels, datamodule.preprocess)
    if trainer.is_global_zero:
        store_in_checkpoint(checkpoint, module)
    trainer.strategy.barrier("calibrated")
    log.info("temperature scaling: T = %.3f fitted on %d validation images", temperature, len(val))
    return temperature


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path``, with ``last`` meaning the newest last.ckpt of this task's runs."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        ckpt_path = str(find_last(cfg.paths.log_dir, cfg.task_name))
        log.info("ckpt_path=last: %s", ckpt_path)
    return ckpt_path


def run_command() -> str:
    """The command line of this run without its ``ckpt_path``: what resumes it, given one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    except ValueError:  # not started by Hydra (a test or a Python caller)
        overrides = []
    return " ".join(["galaxy-train", *overrides])


def prepare_output_dir(cfg: DictConfig, ckpt_path: str | None) -> Path:
    """The run directory with the resolved config (and what the run resumes from)."""
    output_dir = Path(cfg.paths.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = {k: _container(v) for k, v in cfg.items() if k != "hydra"}
        resolved["ckpt_path"] = ckpt_path
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        if ckpt_path and cfg.get("train", True):
            (output_dir / "resumed_from.txt").write_text(f"{Path(ckpt_path).resolve()}\n")
    except OSError as err:
        raise ConfigError(f"cannot write the run directory {output_dir} ({err.strerror or err}); "
                          "choose a writable paths.log_dir with free space") from None
    return output_dir


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the experiment described by ``cfg``; return the final metrics (floats by name)."""
    validate_config(cfg)
    ckpt_path = resolve_checkpoint(cfg)
    output_dir = prepare_output_dir(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    perf.apply(cfg.perf.get("tune_malloc", True), cfg.perf.get("threads"),
               cfg.perf.get("matmul_precision"))
    if cfg.get("train", True) and ckpt_path:
        refuse_resume_of_old_format(ckpt_path)

    if cfg.get("print_config", False) and os.environ.get("LOCAL_RANK", "0") == "0":
        print_config_tree(cfg)
    datamodule, module, trainer = build(cfg)
    if ckpt_path:  # the same network for the same data, or a one-line refusal
        check_resume(ckpt_path, dict(module.hparams))
    for callback in trainer.callbacks:
        if isinstance(callback, GracefulStop):
            callback.resume_command = run_command()
    log.info("torch %s, %d threads, precision %s, compile %s", torch.__version__,
             torch.get_num_threads(), cfg.trainer.get("precision"), bool(cfg.perf.compile))
    info = datamodule.info
    log.info("model %s: %d parameters; data %s (%d images, %dx%dx%d, %d classes)",
             cfg.model._target_, count_parameters(module),
             info.path, info.num_images, info.height, info.width, info.channels, info.num_classes)

    if cfg.get("train", True):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # stopped by Ctrl-C or SIGTERM, after GracefulStop saved
            stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
            raise SystemExit(stop.exit_code if stop is not None else 128 + 15) from None
    metrics = _scalars(trainer)

    if cfg.get("test", True):
        if cfg.get("train", True):
            weights = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            if weights is None:
                log.warning("no best checkpoint was saved; testing the weights of the last step")
        else:  # test only: the given checkpoint (validate_config made sure there is one)
            weights = ckpt_path
        # The tested weights are loaded here rather than by trainer.test(ckpt_path=...): after a
        # fit with weight averaging, Lightning's EMA callback would restore the online weights
        # (its `current_model_state`) instead of the averaged ones the checkpoint was chosen for.
        if weights is not None:
            load_weights(module, weights)
            if cfg.get("calibrate", False):
                calibrate_checkpoint(trainer, module, datamodule, weights)
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update(_scalars(trainer))
        log_run_hyperparameters(trainer, cfg, metrics)
        log.info("test accuracy %.4f (best validation accuracy %.4f); outputs in %s",
                 metrics.get("test/acc", float("nan")), metrics.get("val/acc_best", float("nan")),
                 output_dir)
    finish_loggers(trainer)
    return metrics


def finish_loggers(trainer: L.Trainer) -> None:
    """Close what the loggers keep open, so that their stores are complete when the run returns
    (W&B writes its run file in a background service until the run is finished; each job of a
    sweep is its own W&B run)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


class RunDirectoryCheck(Callback):
    """Hydra callback: Hydra creates the run (or sweep) directory before galaxy-train starts, and
    reports a failure with a traceback; this checks first, so an unwritable or full log directory
    is one line too (part of the entry point's boundary: it prints and exits 2)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.sweep.dir))

    @staticmethod
    def _check(directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            print(f"error: cannot create the run directory {directory} ({err.strerror or err}); "
                  "choose a writable paths.log_dir with free space", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="train")
@cli_boundary
def main(cfg: DictConfig) -> float | None:
    """``galaxy-train [group=option ...] [key=value ...]``: one run, or a sweep with ``-m``.

    Returns the metric named by ``optimized_metric``, which Hydra sweepers optimise. A run stopped
    by Ctrl-C or SIGTERM (after saving, see ``GracefulStop``) exits with 130 or 143."""
    metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
