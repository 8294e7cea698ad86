"""One training run from a composed config: validate, prepare data, fit, test, write outputs.

``galaxy-train`` (and ``python train.py`` in a checkout, ``python -m galaxy_lightning.train``) is
the Hydra entry point :func:`main`; tests call :func:`train` directly with a config from
``hydra.compose``.

A run is set up in three steps, cheapest first, so that a bad value is refused before any data is
downloaded or simulated: :func:`build` (the DataModule, the Trainer with its callbacks, loggers
and plugins: objects only), :func:`prepare_data` (download, simulate or read the data) and
:func:`build_module` (the classifier, sized from the prepared data). :func:`build_and_prepare`
takes all three for tests and Python callers that want a fit-ready set.
"""

from __future__ import annotations

import inspect
import logging
import os
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from galaxy_lightning import perf
from galaxy_lightning.calibration import calibrate, store_in_checkpoint
from galaxy_lightning.callbacks import GracefulStop
from galaxy_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_data_of_checkpoint,
    check_model_of_checkpoint,
    find_last,
    read_checkpoint,
    read_resumable,
)
from galaxy_lightning.config import (
    CONFIG_PACKAGE,
    construct,
    import_target,
    length_steps,
    resolved,
    validate_config,
)
from galaxy_lightning.console import print_config_tree, quiet_third_party
from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.errors import (
    EXIT_BAD_INPUT,
    EXIT_TERMINATED,
    ConfigError,
    cli_boundary,
    config_key,
)
from galaxy_lightning.files import write_atomic
from galaxy_lightning.loggers import build_loggers, finish_loggers, log_run_hyperparameters
from galaxy_lightning.models import count_parameters
from galaxy_lightning.module import GalaxyClassifier

log = logging.getLogger(__name__)

#: Callbacks that only feed loggers, and that Lightning refuses to run without one: with
#: ``logger=none`` they are not built.
LOGGER_ONLY_CALLBACKS: tuple[type[L.Callback], ...] = (LearningRateMonitor,)


def _scalars(trainer: L.Trainer) -> dict[str, float]:
    """The trainer's current scalar metrics as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1}


def build(cfg: DictConfig) -> tuple[GalaxyDataModule, L.Trainer]:
    """The DataModule and the Trainer with its callbacks, loggers and plugins: objects only, no
    data touched, so that their own checks refuse a bad value before any data is downloaded or
    simulated (:func:`prepare_data` is the next step)."""
    datamodule: GalaxyDataModule = construct(cfg.data, "data")
    logger_nodes = cfg.get("logger") or {}
    with_loggers = any(node is not None for node in logger_nodes.values())
    callbacks = build_callbacks(cfg.get("callbacks") or {}, with_loggers)
    loggers = build_loggers(logger_nodes, list(cfg.get("tags") or []))
    check_devices(cfg.trainer)
    try:
        trainer: L.Trainer = construct(cfg.trainer, "trainer", callbacks=callbacks,
                                       logger=loggers or False, plugins=trainer_plugins())
    except (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError) as err:
        # Lightning's own checks of its settings (accelerator, devices, precision, strategy)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"trainer: {' '.join(str(err).split())}; {TRAINER_FIX}") from None
    return datamodule, trainer


def prepare_data(datamodule: GalaxyDataModule) -> None:
    """Download, simulate or read the data, whichever its source does: the one expensive step of
    setting up a run (a prepared file that is up to date is reused)."""
    with config_key("data"):
        datamodule.prepare_data()


def apply_length(cfg: DictConfig, datamodule: GalaxyDataModule, trainer: L.Trainer) -> None:
    """Set the run's number of steps from its training set (``length``) when ``trainer.max_steps``
    is -1: ``max(min_steps, epochs x batches per epoch)``. A fixed number of steps trains a
    1,500-image set for hundreds of epochs (over-fitting most of the run) and a large one for
    few; an epoch count with a floor gives each what it needs. Before :func:`build_module`, so
    that the schedule (``${trainer.max_steps}``) is sized to the same number."""
    length = cfg.get("length")
    if not length or cfg.trainer.get("max_steps", -1) != -1:
        return
    # optimizer steps: with gradient accumulation one per `accumulate` batches (and one for the
    # rest at the end of an epoch)
    accumulate = int(trainer.accumulate_grad_batches)
    per_epoch = -(-datamodule.train_batches_per_epoch(trainer.world_size) // accumulate)
    steps = by_length = length_steps(length, per_epoch)
    max_epochs = cfg.trainer.get("max_epochs", -1)
    if isinstance(max_epochs, int) and max_epochs >= 1:  # an epoch limit (debug=default) ends it
        steps = min(steps, max_epochs * per_epoch)       # first: the schedule ends with the run
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
    trainer.fit_loop.epoch_loop.max_steps = steps  # (what Trainer(max_steps=...) sets)
    log.info("length: %d steps (%d epochs of %d batches, at least %d steps%s)", steps,
             int(length.epochs), per_epoch, int(length.min_steps),
             f"; trainer.max_epochs={max_epochs} ends it sooner" if steps < by_length else "")


def build_module(cfg: DictConfig, datamodule: GalaxyDataModule) -> GalaxyClassifier:
    """The classifier, sized from the prepared data's input spec (:func:`prepare_data` first)."""
    module = GalaxyClassifier(model=resolved(cfg.model), input_spec=datamodule.spec.to_dict(),
                              optimizer=resolved(cfg.optimizer),
                              scheduler=resolved(cfg.get("scheduler")) or None,
                              label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                              data=resolved(cfg.data), compile=bool(cfg.perf.compile),
                              task=resolved(cfg.get("task")))
    return module.set_inference(tta=bool(cfg.get("tta", False)))


def build_and_prepare(cfg: DictConfig) -> tuple[GalaxyDataModule, GalaxyClassifier, L.Trainer]:
    """:func:`build`, :func:`prepare_data` and :func:`build_module`, in :func:`train`'s order:
    everything a ``trainer.fit(module, datamodule=datamodule)`` needs."""
    datamodule, trainer = build(cfg)
    prepare_data(datamodule)
    apply_length(cfg, datamodule, trainer)
    return datamodule, build_module(cfg, datamodule), trainer


def build_callbacks(nodes: DictConfig | dict[str, Any], with_loggers: bool) -> list[L.Callback]:
    """The configured callbacks, each given at construction what only the run knows: a callback
    that takes ``resume_command`` (:class:`~galaxy_lightning.callbacks.GracefulStop`) gets the
    command line that resumes this run. Without loggers, :data:`LOGGER_ONLY_CALLBACKS` are left
    out (decided from the target class, before anything is built)."""
    run = {"resume_command": run_command()}
    callbacks = []
    for name, node in nodes.items():
        if node is None:
            continue
        key = f"callbacks.{name}"
        target = import_target(node["_target_"], key) if "_target_" in node else None
        if not with_loggers and isinstance(target, type) \
                and issubclass(target, LOGGER_ONLY_CALLBACKS):
            continue
        takes = _parameters(target)
        callbacks.append(construct(node, key, **{k: v for k, v in run.items() if k in takes}))
    return callbacks


def _parameters(target: Any) -> set[str]:
    """The names a callable takes (none for a target without a signature, or no target)."""
    try:
        return set(inspect.signature(target).parameters) if target is not None else set()
    except (TypeError, ValueError):
        return set()


def trainer_plugins() -> list[Any]:
    """Checkpoints written atomically; under SLURM, the cluster environment with Lightning's own
    requeue off: SLURM's SIGUSR1 before a time limit is GracefulStop's (a checkpoint between
    steps, then ``scontrol requeue``), not Lightning's (a checkpoint from inside the signal
    handler, mid-step, as ``hpc_ckpt_<n>.ckpt``)."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


#: What to do about a trainer setting this machine cannot satisfy.
TRAINER_FIX = ("choose settings this machine has: trainer=cpu, or trainer.accelerator=auto "
               "trainer.devices=1 (see conf/trainer/)")


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


def load_weights(module: GalaxyClassifier, checkpoint: str) -> None:
    """The weights the checkpoint was saved with (with weight averaging: the averaged weights,
    which is what Lightning's EMA callback stores under ``state_dict``) and its temperature."""
    state = read_checkpoint(checkpoint)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    module.weights_from = checkpoint
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
    module.weights_from = str(target)  # the tested weights, now with their temperature
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
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    except ValueError:  # not started by Hydra (a test or a Python caller)
        overrides = []
    return " ".join(["galaxy-train", *map(shlex.quote, overrides)])  # pasteable into any shell


def _write_run_file(output_dir: Path, name: str, text: str) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / name, text)
    except OSError as err:
        raise ConfigError(f"cannot write the run directory {output_dir} ({err.strerror or err}); "
                          "choose a writable paths.log_dir with free space") from None


def prepare_output_dir(cfg: DictConfig, ckpt_path: str | None) -> Path:
    """The run directory with the resolved config."""
    output_dir = Path(cfg.paths.output_dir)
    config = {k: resolved(v) for k, v in cfg.items() if k != "hydra"}
    config["ckpt_path"] = ckpt_path
    _write_run_file(output_dir, "config.yaml", OmegaConf.to_yaml(config))
    return output_dir


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the experiment described by ``cfg``; return the final metrics (floats by name)."""
    clock = PhaseClock()
    quiet_third_party()
    validate_config(cfg)
    ckpt_path = resolve_checkpoint(cfg)
    resuming = bool(ckpt_path) and cfg.get("train", True)
    if ckpt_path:  # readable, resumable, the same network: checked before any data is touched
        checkpoint = read_resumable(ckpt_path, resuming=resuming)
        check_model_of_checkpoint(ckpt_path, checkpoint, resolved(cfg.model),
                                  resolved(cfg.get("task")))
    output_dir = prepare_output_dir(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    perf.apply(cfg.perf.get("tune_malloc", True), cfg.perf.get("threads"),
               cfg.perf.get("matmul_precision"))

    datamodule, trainer = build(cfg)  # objects and their checks, before any data is touched
    # the tree after those checks: a refused value is one line, not a page of config above it
    if cfg.get("print_config", False) and os.environ.get("LOCAL_RANK", "0") == "0":
        print_config_tree(cfg)
    prepare_data(datamodule)
    apply_length(cfg, datamodule, trainer)
    module = build_module(cfg, datamodule)
    if ckpt_path:  # ... for the same data
        check_data_of_checkpoint(ckpt_path, checkpoint, module.hparams["input_spec"])
        del checkpoint
        if resuming:
            _write_run_file(output_dir, "resumed_from.txt", f"{Path(ckpt_path).resolve()}\n")
    log_run_hyperparameters(trainer, cfg)
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

    clock.lap("setup")
    if cfg.get("train", True):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # stopped by Ctrl-C or SIGTERM, after GracefulStop saved
            # the exit status depends on the signal, which only GracefulStop saw
            stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
            raise SystemExit(stop.exit_code if stop is not None else EXIT_TERMINATED) from None
    metrics = _scalars(trainer)
    clock.lap("fit")

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
        # Loading them records their checkpoint in the module (`weights_from`), which is how
        # metrics.json learns which checkpoint was tested: it is known only now, after the fit.
        if weights is not None:
            load_weights(module, weights)
            if cfg.get("calibrate", False):
                calibrate_checkpoint(trainer, module, datamodule, weights, output_dir,
                                     own=bool(cfg.get("train", True)))
            clock.lap("load_and_calibrate")
        trainer.test(module, datamodule=datamodule, verbose=False)
        clock.lap("test")
        metrics.update(_scalars(trainer))
        log_run_hyperparameters(trainer, cfg, metrics)
        log.info("test accuracy %.4f (best validation accuracy %.4f); outputs in %s",
                 metrics.get("test/acc", float("nan")), metrics.get("val/acc_best", float("nan")),
                 output_dir)
    finish_loggers(trainer)
    clock.lap("loggers")
    if trainer.is_global_zero and (output_dir / "metrics.json").is_file():
        _write_report(output_dir)
        clock.lap("report")
    if trainer.is_global_zero:
        clock.write(output_dir / "timings.json", trainer.profiler)
    return metrics


class PhaseClock:
    """Where a run's time went: wall seconds of each phase of :func:`train` (setup, fit,
    calibration, test, report), written to ``timings.json``; with ``trainer.profiler=simple``
    also every hook and step Lightning's profiler timed (calls, total, first: the first training
    step holds the compilation), which is what ``python -m galaxy_lightning.bench --only-recipe``
    turns into the profile of a recipe."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def write(self, path: Path, profiler: Any) -> None:
        timings: dict[str, Any] = {"phases_s": self.phases,
                                   "total_s": time.perf_counter() - self.start}
        durations = getattr(profiler, "recorded_durations", None)
        if durations:
            timings["profile"] = {name: {"calls": len(d), "total_s": sum(d), "first_s": d[0]}
                                  for name, d in durations.items() if d}
        try:
            write_atomic(path, json.dumps(timings, indent=1))
        except OSError as err:  # timings are a by-product; never the cause of a failed run
            log.warning("could not write %s (%s)", path, err)


def _write_report(output_dir: Path) -> None:
    """report.html beside the run's outputs; a report that cannot be written costs a warning,
    never the finished run (``galaxy-report`` writes it again)."""
    from galaxy_lightning.report import write_report  # deferred: jinja2 and astropy.stats

    try:
        log.info("report: %s", write_report(output_dir))
    except Exception as err:  # noqa: BLE001 (the report is optional; the run is done)
        log.warning("could not write report.html in %s (%s); run galaxy-report %s",
                    output_dir, err, output_dir)


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
            raise SystemExit(EXIT_BAD_INPUT) from None


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
