"""Validation of a composed run config, before any data is touched or any step is trained.

Hydra already refuses overrides of keys that do not exist (``model.chanels=...``). What it cannot
see is a key that a config file or a ``+key=`` override adds but the ``_target_`` does not accept,
or a value that is out of range; those would otherwise surface as a traceback minutes into a run.
Every problem here is a :class:`GalaxyError` naming the key and the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from galaxy_lightning.errors import GalaxyError

#: Top-level keys of ``conf/train.yaml`` (plus ``hydra``, which Hydra adds).
TOP_LEVEL_KEYS = frozenset({
    "task_name", "seed", "ckpt_path", "train", "test", "optimized_metric",
    "paths", "data", "model", "optimizer", "scheduler", "label_smoothing", "tta", "trainer",
    "logger", "callbacks", "perf", "hydra",
})
PERF_KEYS = frozenset({"compile", "threads", "matmul_precision", "tune_malloc"})
#: Arguments that the training code fills in; a config must not set them.
FILLED_IN = {
    "model": {"in_channels", "num_classes", "image_size"},
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
    "trainer": {"callbacks", "logger"},
}


def _target(node: DictConfig, key: str) -> Callable[..., Any]:
    try:
        return get_object(node["_target_"])
    except Exception:  # noqa: BLE001 - hydra raises several types for a bad path
        raise GalaxyError(f"{key}._target_={node['_target_']!r} cannot be imported; check its "
                          "spelling") from None


def _check_keys(node: Any, key: str, filled_in: Iterable[str] = ()) -> None:
    """Every key of a ``_target_`` node must be a parameter of the target (recursively)."""
    if not isinstance(node, DictConfig):
        if isinstance(node, ListConfig):
            for i, item in enumerate(node):
                _check_keys(item, f"{key}[{i}]")
        return
    if "_target_" in node:
        target = _target(node, key)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        accepted = {name for name in params if name not in ("self", "args", "kwargs")}
        for name in node:
            if str(name).startswith("_") and str(name).endswith("_"):
                continue
            if name in filled_in:
                raise GalaxyError(f"{key}.{name} is set from the data or by the training code; "
                                  f"remove it from the config")
            if not takes_any and name not in accepted:
                raise GalaxyError(f"unknown config key '{key}.{name}' for {node['_target_']} "
                                  f"(it accepts: {', '.join(sorted(accepted - set(filled_in)))}); "
                                  "remove it or fix its spelling")
    for name in node:
        if not str(name).startswith("_"):
            _check_keys(node._get_node(name), f"{key}.{name}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise GalaxyError(message)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`GalaxyError` for unknown keys or invalid values in a composed run config."""
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise GalaxyError(f"unknown top-level config key '{unknown[0]}' (known: "
                          f"{', '.join(sorted(TOP_LEVEL_KEYS - {'hydra'}))}); remove it or fix its "
                          "spelling")
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    if missing:
        raise GalaxyError(f"config key '{missing[0]}' has no value (???); set it on the command "
                          f"line, e.g. {missing[0]}=...")
    for group in ("data", "model", "optimizer", "trainer"):
        _require(group in cfg and isinstance(cfg[group], DictConfig) and "_target_" in cfg[group],
                 f"config group '{group}' is missing or has no _target_; choose one, e.g. "
                 f"{group}=<name> (see conf/{group}/)")
        _check_keys(cfg[group], group, FILLED_IN.get(group, ()))
    for group in ("logger", "callbacks"):
        if cfg.get(group):
            for name in cfg[group]:
                _check_keys(cfg[group]._get_node(name), f"{group}.{name}")

    perf = cfg.get("perf") or {}
    for key in perf:
        _require(key in PERF_KEYS, f"unknown config key 'perf.{key}' (known: "
                                   f"{', '.join(sorted(PERF_KEYS))}); remove it or fix its spelling")
    _require(perf.get("threads") is None or (isinstance(perf.threads, int) and perf.threads >= 1),
             f"perf.threads={perf.get('threads')} must be a positive integer or null")

    data = cfg.data
    for key in ("batch_size", "eval_batch_size"):
        if key in data:
            value = data[key]
            _require(isinstance(value, int) and value >= 1,
                     f"data.{key}={value} must be a positive integer")
    _require(isinstance(cfg.seed, int), f"seed={cfg.seed} must be an integer")
    _require(cfg.get("train", True) or cfg.get("ckpt_path") is not None,
             "train=false needs ckpt_path=<checkpoint> to test")

    trainer = cfg.trainer
    max_steps = trainer.get("max_steps", -1)
    _require(isinstance(max_steps, int) and (max_steps == -1 or max_steps >= 1),
             f"trainer.max_steps={max_steps} must be -1 (no limit) or a positive integer")
    interval = trainer.get("val_check_interval", None)
    _require(interval is None or (isinstance(interval, (int, float)) and interval > 0),
             f"trainer.val_check_interval={interval} must be positive")

    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert isinstance(optimizer, dict)
    lr = optimizer.get("lr")
    _require(lr is None or (isinstance(lr, (int, float)) and lr > 0),
             f"optimizer.lr={lr} must be a positive number")
    try:  # let the optimizer itself check the rest (betas, momentum, weight decay, ...)
        dummy = instantiate(optimizer, _partial_=True)([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise GalaxyError(f"optimizer ({optimizer['_target_']}) rejects its settings: {err}; fix "
                          "the optimizer.* values") from None

    smoothing = cfg.get("label_smoothing", 0.0)
    _require(isinstance(smoothing, (int, float)) and 0 <= smoothing < 1,
             f"label_smoothing={smoothing} must be in [0, 1)")
    _require(isinstance(cfg.get("tta", False), bool), f"tta={cfg.get('tta')} must be true or false")
    if cfg.get("scheduler"):
        _require("_target_" in cfg.scheduler, "scheduler has no _target_; choose one: scheduler="
                 "none, cosine or onecycle (see conf/scheduler/)")
        _check_keys(cfg.scheduler, "scheduler", FILLED_IN["scheduler"])
        scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True)
        assert isinstance(scheduler, dict)
        _require(scheduler.get("total_steps", 1) is None or scheduler.get("total_steps", 1) >= 1,
                 f"scheduler.total_steps={scheduler.get('total_steps')} must be positive: a "
                 "schedule needs trainer.max_steps (not -1)")
        try:  # the scheduler checks its own settings on the dummy optimizer
            instantiate(scheduler, _partial_=True)(dummy)
        except (ValueError, TypeError) as err:
            raise GalaxyError(f"scheduler ({scheduler['_target_']}) rejects its settings: {err}; "
                              "fix the scheduler.* values") from None
