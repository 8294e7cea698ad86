"""One training run from a composed config: validate, prepare data, fit, test, write outputs.

``train.py`` at the repository root is the Hydra entry point around :func:`train`; tests call
:func:`train` directly with a config from ``hydra.compose``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from galaxy_lightning import perf
from galaxy_lightning.config import validate_config
from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.errors import GalaxyError, user_errors
from galaxy_lightning.models import count_parameters
from galaxy_lightning.module import GalaxyClassifier

log = logging.getLogger(__name__)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _scalars(trainer: L.Trainer) -> dict[str, float]:
    """The trainer's current scalar metrics as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if torch.is_tensor(v) and v.numel() == 1}


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run config flattened to ``group/key`` primitives, for TensorBoard's hparams view."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            out[prefix] = str(node)
        elif node is None or isinstance(node, (bool, int, float, str)):
            out[prefix] = node if node is not None else "null"

    cfg_dict = {k: _container(cfg.get(k)) for k in ("seed", "data", "model", "optimizer",
                                                    "scheduler", "label_smoothing", "tta", "trainer")}
    walk("", cfg_dict)
    return out


def build(cfg: DictConfig) -> tuple[GalaxyDataModule, GalaxyClassifier, L.Trainer]:
    """Instantiate the DataModule, the LightningModule (sized from the data) and the Trainer."""
    with user_errors():
        return _build(cfg)


def _build(cfg: DictConfig) -> tuple[GalaxyDataModule, GalaxyClassifier, L.Trainer]:
    datamodule: GalaxyDataModule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    info = datamodule.info
    if info.height != info.width:
        raise GalaxyError(f"{info.path}: images are {info.height}x{info.width}; the models need "
                          "square images (set a square crop in the data config)")
    module = GalaxyClassifier(model=_container(cfg.model), optimizer=_container(cfg.optimizer),
                              num_classes=info.num_classes, class_names=info.class_names,
                              in_channels=info.channels, image_size=info.height,
                              scale=float(datamodule.scale), compile=bool(cfg.perf.compile),
                              data=_container(cfg.data),
                              crop=getattr(datamodule.source, "crop", None),
                              resize=getattr(datamodule.source, "resize", None),
                              scheduler=_container(cfg.get("scheduler")) or None,
                              label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                              tta=bool(cfg.get("tta", False)))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers: list[Logger] = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()
                             if lg is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the experiment described by ``cfg``; return the final metrics (floats by name)."""
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(
        OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    perf.apply(cfg.perf.get("tune_malloc", True), cfg.perf.get("threads"),
               cfg.perf.get("matmul_precision"))

    datamodule, module, trainer = build(cfg)
    log.info("torch %s, %d threads, precision %s, compile %s", torch.__version__,
             torch.get_num_threads(), cfg.trainer.get("precision"), bool(cfg.perf.compile))
    info = datamodule.info
    log.info("model %s: %d parameters; data %s (%d images, %dx%dx%d, %d classes)",
             cfg.model._target_, count_parameters(module),
             info.path, info.num_images, info.height, info.width, info.channels, info.num_classes)

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _scalars(trainer)

    if cfg.get("test", True):
        if cfg.get("train", True):
            weights = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            if weights is None:
                log.warning("no best checkpoint was saved; testing the weights of the last step")
        else:  # test only: the given checkpoint (validate_config made sure there is one)
            weights = cfg.get("ckpt_path")
        trainer.test(module, datamodule=datamodule, ckpt_path=weights, verbose=False)
        metrics.update(_scalars(trainer))
        final = {f"hparams/{k.replace('/', '_')}": metrics[k]
                 for k in ("test/acc", "val/acc_best") if k in metrics}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(flat_hparams(cfg), final)
        log.info("test accuracy %.4f (best validation accuracy %.4f); outputs in %s",
                 metrics.get("test/acc", float("nan")), metrics.get("val/acc_best", float("nan")),
                 output_dir)
    return metrics
