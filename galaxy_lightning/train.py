"""One training run from a composed config: validate, prepare data, fit, test, write outputs.

``galaxy-train`` (and ``python train.py`` in a checkout, ``python -m galaxy_lightning.train``) is
the Hydra entry point :func:`main`; tests call :func:`train` directly with a config from
``hydra.compose``.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from galaxy_lightning import perf
from galaxy_lightning.calibration import calibrate, store_in_checkpoint
from galaxy_lightning.callbacks import GracefulStop, RunArtifacts
from galaxy_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_data_of_checkpoint,
    check_model_of_checkpoint,
    find_last,
    read_checkpoint,
    read_resumable,
)
from galaxy_lightning.config import CONFIG_PACKAGE, construct, validate_config
from galaxy_lightning.console import print_config_tree, quiet_third_party
from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.errors import ConfigError, cli_boundary, config_key
from galaxy_lightning.models import count_parameters
from galaxy_lightning.module import GalaxyClassifier

log = logging.getLogger(__name__)

#: What the hparams views of the loggers show of a run: every top-level config key (so a new key
#: is recorded without a second list to update) but those that say where, how or what to print,
#: not what was trained ...
NOT_HPARAMS = frozenset({"hydra", "paths", "logger", "callbacks", "perf", "ckpt_path", "train",
                         "test", "print_config", "optimized_metric", "task_name", "experiment",
                         "debug", "hparams_search", "local"})
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
    loggers: list[Logger] = [_construct_logger(lg, name)
                             for name, lg in (cfg.get("logger") or {}).items() if lg is not None]
    if not loggers:  # Lightning's LearningRateMonitor refuses to run without a logger to feed
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    tag_loggers(loggers, list(cfg.get("tags") or []))
    check_devices(cfg.trainer)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # SLURM's SIGUSR1 before a time limit is GracefulStop's (a checkpoint between steps, then
        # a requeue), not Lightning's (a checkpoint from inside the signal handler, mid-step)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        trainer: L.Trainer = construct(cfg.trainer, "trainer", callbacks=callbacks,
                                       logger=loggers or False, plugins=plugins)
    except (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError) as err:
        # Lightning's own checks of its settings (accelerator, devices, precision, strategy)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"trainer: {' '.join(str(err).split())}; {TRAINER_FIX}") from None
    with config_key("data"):
        datamodule.prepare_data()
    module = GalaxyClassifier(model=_container(cfg.model), input_spec=datamodule.spec.to_dict(),
                              optimizer=_container(cfg.optimizer),
                              scheduler=_container(cfg.get("scheduler")) or None,
                              label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                              data=_container(cfg.data), compile=bool(cfg.perf.compile))
    module.set_inference(tta=bool(cfg.get("tta", False)))
    return datamodule, module, trainer


#: What to do about a trainer setting this machine cannot satisfy.
TRAINER_FIX = ("choose settings this machine has: trainer=cpu, or trainer.accelerator=auto "
               "trainer.devices=1 (see conf/trainer/)")


def _construct_logger(node: DictConfig, name: str) -> Logger:
    """A logger; an optional one whose package is not installed is one line naming the extra."""
    try:
        return construct(node, f"logger.{name}")
    except ModuleNotFoundError as err:
        raise ConfigError(f"logger.{name}: needs the package {err.name!r}, which is not "
                          "installed; pip install 'galaxy_lightning[loggers]' (or choose another "
                          "logger)") from None


def check_devices(trainer: DictConfig) -> None:
    """Refuse more devices than the machine has, before Lightning starts processes for them:
    more GPUs than are visible, or more CPU processes than cores."""
    devices, accelerator = trainer.get("devices", 1), str(trainer.get("accelerator", "auto"))
    if not isinstance(devices, int) or devices < 1:
        return  # "auto", a list of device ids, or a value Lightning itself refuses
    if accelerator == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if cores and devices > cores:
            raise ConfigError(f"trainer.devices={devices} CPU processes but this machine has "
                              f"{cores} cores; lower trainer.devices (at most {cores})")
    elif accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if devices > visible:
            raise ConfigError(f"trainer.devices={devices} GPUs but this machine has {visible}; "
                              f"lower trainer.devices (at most {visible})")


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


def log_run_hyperparameters(trainer: L.Trainer, cfg: DictConfig,
                            metrics: dict[str, float] | None = None) -> None:
    """Record the run's config in every logger's hparams view (each logger flattens the nested
    config itself): at the start of the run, so that a run that is stopped, or that does not
    test, is recorded too; and with ``metrics`` at its end for the loggers that take metrics
    with their hyperparameters (TensorBoard's hparams view), under the names the run logged."""
    from galaxy_lightning.config import top_level_keys

    params = {k: _container(cfg.get(k)) for k in sorted(top_level_keys() - NOT_HPARAMS) if k in cfg}
    for logger in trainer.loggers:
        takes_metrics = "metrics" in inspect.signature(logger.log_hyperparams).parameters
        if metrics is None:
            logger.log_hyperparams(params)
        elif takes_metrics:
            results = {k: metrics[k] for k in HPARAM_METRICS if k in metrics}
            logger.log_hyperparams(params, metrics=results, step=trainer.global_step)


def load_weights(module: GalaxyClassifier, checkpoint: str) -> None:
    """The weights the checkpoint was saved with (with weight averaging: the averaged weights,
    which is what Lightning's EMA callback stores under ``state_dict``) and its temperature."""
    state = read_checkpoint(checkpoint)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    module.set_inference(calibrated=state.get("galaxy_lightning", {}).get("inference", {})
                         .get("calibrated", False))


def calibrate_checkpoint(trainer: L.Trainer, module: GalaxyClassifier,
                         datamodule: GalaxyDataModule, checkpoint: str, output_dir: Path,
                         own: bool) -> Path:
    """Fit the temperature of the module's weights (loaded from ``checkpoint``) on the
    validation split, with the run's test-time augmentation, and store it: in ``checkpoint``
    when it is this run's own best checkpoint, else (``train=false`` on a checkpoint the user
    gave) in a calibrated copy in this run's directory, so the user's file is never modified."""
    val = datamodule.split("val")
    temperature = calibrate(module, val.images, val.labels, datamodule.preprocess)
    target = Path(checkpoint) if own else output_dir / "checkpoints" / "calibrated.ckpt"
    if trainer.is_global_zero:
        store_in_checkpoint(checkpoint, module, target)
    trainer.strategy.barrier("calibrated")
    log.info("temperature scaling: T = %.3f fitted on %d validation images; stored in %s",
             temperature, len(val), target)
    return target


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path``, with ``last`` meaning the newest last.ckpt of this task's runs; and for a
    SLURM job that was requeued (GracefulStop saved, then requeued it) the last.ckpt in its own
    run directory, which the requeued job shares with the first attempt."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        ckpt_path = str(find_last(cfg.paths.log_dir, cfg.task_name))
        log.info("ckpt_path=last: %s", ckpt_path)
    own_last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path is None and cfg.get("train", True) and \
            int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and own_last.is_file():
        ckpt_path = str(own_last)
        log.info("requeued SLURM job: resuming from %s", ckpt_path)
    return ckpt_path


def run_command() -> str:
    """The command line of this run without its ``ckpt_path``: what resumes it, given one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    except ValueError:  # not started by Hydra (a test or a Python caller)
        overrides = []
    return " ".join(["galaxy-train", *map(shlex.quote, overrides)])  # pasteable into any shell


def _write_run_file(output_dir: Path, name: str, text: str) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write the run directory {output_dir} ({err.strerror or err}); "
                          "choose a writable paths.log_dir with free space") from None


def prepare_output_dir(cfg: DictConfig, ckpt_path: str | None) -> Path:
    """The run directory with the resolved config."""
    output_dir = Path(cfg.paths.output_dir)
    resolved = {k: _container(v) for k, v in cfg.items() if k != "hydra"}
    resolved["ckpt_path"] = ckpt_path
    _write_run_file(output_dir, "config.yaml", OmegaConf.to_yaml(resolved))
    return output_dir


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the experiment described by ``cfg``; return the final metrics (floats by name)."""
    quiet_third_party()
    validate_config(cfg)
    ckpt_path = resolve_checkpoint(cfg)
    resuming = bool(ckpt_path) and cfg.get("train", True)
    if ckpt_path:  # readable, resumable, the same network: checked before any data is touched
        checkpoint = read_resumable(ckpt_path, resuming=resuming)
        check_model_of_checkpoint(ckpt_path, checkpoint, _container(cfg.model))
    output_dir = prepare_output_dir(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    perf.apply(cfg.perf.get("tune_malloc", True), cfg.perf.get("threads"),
               cfg.perf.get("matmul_precision"))

    if cfg.get("print_config", False) and os.environ.get("LOCAL_RANK", "0") == "0":
        print_config_tree(cfg)
    datamodule, module, trainer = build(cfg)
    if ckpt_path:  # ... for the same data
        check_data_of_checkpoint(ckpt_path, checkpoint, module.hparams["input_spec"])
        del checkpoint
        if resuming:
            _write_run_file(output_dir, "resumed_from.txt", f"{Path(ckpt_path).resolve()}\n")
    log_run_hyperparameters(trainer, cfg)
    for callback in trainer.callbacks:
        if isinstance(callback, GracefulStop):
            callback.resume_command = run_command()
    log.info("torch %s, %d threads, precision %s, compile %s", torch.__version__,
             torch.get_num_threads(), cfg.trainer.get("precision"), bool(cfg.perf.compile))
    warning = perf.slow_precision_warning(cfg.trainer.get("precision"),
                                          cfg.trainer.get("accelerator", "auto"))
    if warning:
        log.warning(warning)
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
                weights = str(calibrate_checkpoint(trainer, module, datamodule, weights, output_dir,
                                                   own=bool(cfg.get("train", True))))
        for callback in trainer.callbacks:
            if isinstance(callback, RunArtifacts):
                callback.tested_checkpoint = weights
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
