"""Run configs: where they live, how they are checked, and how a ``_target_`` node becomes an object.

The configs ship inside the package as ``galaxy_lightning.conf`` (the repository's ``conf/``
folder, mapped by ``pyproject.toml``), so an installed package trains from any directory.

:func:`validate_config` runs before any data is touched. It derives what is allowed from the
configs and targets themselves: the top-level keys from ``conf/train.yaml``, the ``perf`` keys
from ``conf/perf/default.yaml``, and the keys of every ``_target_`` node from the target's
signature. Value ranges are checked by the targets themselves when :func:`construct` builds them
(the DataModule, the model, the Trainer, the optimizer); only keys that have no target
(``seed``, ``label_smoothing``, ``tta``, ``perf.*``, ``trainer.max_steps`` where Lightning
accepts 0) are checked here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from importlib.resources import files
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from galaxy_lightning.decision_tree import check_task
from galaxy_lightning.errors import ConfigError, config_key
from galaxy_lightning.perf import check_matmul_precision

#: The package that holds the Hydra configs (``pkg://galaxy_lightning.conf``).
CONFIG_PACKAGE = "galaxy_lightning.conf"
#: Arguments that the training code fills in; a config must not set them.
FILLED_IN = {
    "model": {"in_channels", "num_classes", "image_size"},
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
    "trainer": {"callbacks", "logger", "plugins"},
}


def config_file(*parts: str) -> DictConfig:
    """A config file of the package, e.g. ``config_file("perf", "default.yaml")``."""
    resource = files(CONFIG_PACKAGE).joinpath(*parts)
    loaded = OmegaConf.create(resource.read_text())
    assert isinstance(loaded, DictConfig)
    return loaded


@functools.cache
def top_level_keys() -> frozenset[str]:
    """The keys of ``conf/train.yaml`` and its config groups (plus ``hydra``)."""
    primary = config_file("train.yaml")
    groups = set()
    for entry in primary.get("defaults", []):
        if isinstance(entry, (DictConfig, Mapping)):
            # "optional local", "override /data@x": the group's name is the last word
            groups.update(str(k).split("@")[0].split()[-1].lstrip("/") for k in entry)
    return frozenset({str(k) for k in primary if k != "defaults"} | groups | {"hydra"})


@functools.cache
def perf_keys() -> frozenset[str]:
    return frozenset(str(k) for k in config_file("perf", "default.yaml"))


def resolved(node: Any) -> Any:
    """A config node as plain Python containers, interpolations resolved (what checkpoints and
    loggers store); any other value as it is."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


# -- building objects from config nodes ----------------------------------------------------------
def import_target(path: str, key: str) -> Any:
    """The object at ``path``. A path that names nothing is a config error; a module that fails
    while importing (a bug in it) keeps its own traceback; a package it needs that is not
    installed is named. (Hydra's ``get_object`` wraps all three as ``ImportError``.)"""
    try:
        return get_object(path)
    except ImportError as err:
        cause = err.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name and \
                not path.startswith(cause.name):
            raise ConfigError(f"{key}._target_={path!r} needs the package {cause.name!r}, which "
                              "is not installed; install it (pip install 'galaxy_lightning[dev]' "
                              "has every optional one)") from None
        if cause is not None and not isinstance(cause, (ImportError, AttributeError)):
            raise cause  # the module itself is broken: a bug, with its traceback
        raise ConfigError(f"{key}._target_={path!r} cannot be imported; check its spelling") from None


def _build(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if "_target_" in value:
            return _call(value, key, {})
        return {k: _build(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _call(node: dict[str, Any], key: str, filled_in: Mapping[str, Any]) -> Any:
    target = import_target(node["_target_"], key)
    kwargs = {k: _build(v, f"{key}.{k}") for k, v in node.items() if not k.startswith("_")}
    kwargs.update(filled_in)
    if node.get("_partial_", False):
        return functools.partial(target, **kwargs)
    with config_key(key):
        return target(**kwargs)


def construct(node: DictConfig | Mapping[str, Any], key: str, **filled_in: Any) -> Any:
    """The object a ``_target_`` node describes, nested ``_target_`` nodes built first.

    Like ``hydra.utils.instantiate`` (``_partial_`` included), but an error the target raises
    reaches the caller as itself instead of wrapped: a :class:`ConfigError` gains the config key
    of the node it came from (``data.source: crop=300 is larger than ...``), anything else keeps
    its traceback. ``filled_in`` are arguments the training code supplies (the data's shape).
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(data, dict)
    if "_target_" not in data:
        raise ConfigError(f"{key} has no _target_; choose a config, e.g. {key}=<name>")
    return _call(data, key, filled_in)


# -- validation ----------------------------------------------------------------------------------
def _check_keys(node: Any, key: str, filled_in: Iterable[str] = ()) -> None:
    """Every key of a ``_target_`` node must be a parameter of the target (recursively)."""
    if not isinstance(node, DictConfig):
        if isinstance(node, ListConfig):
            for i, item in enumerate(node):
                _check_keys(item, f"{key}[{i}]")
        return
    if "_target_" in node:
        target = import_target(node["_target_"], key)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}  # a builtin without a signature: accept its keys
        takes_any = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        accepted = {name for name in params if name not in ("self", "args", "kwargs")}
        for name in node:
            if str(name).startswith("_") and str(name).endswith("_"):
                continue
            if name in filled_in:
                raise ConfigError(f"{key}.{name} is set from the data or by the training code; "
                                  "remove it from the config")
            if not takes_any and name not in accepted:
                raise ConfigError(f"unknown config key '{key}.{name}' for {node['_target_']} "
                                  f"(it accepts: {', '.join(sorted(accepted - set(filled_in)))}); "
                                  "remove it or fix its spelling")
    for name in node:
        if not str(name).startswith("_"):
            _check_keys(node._get_node(name), f"{key}.{name}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_label_smoothing(value: Any) -> float:
    """``label_smoothing`` is a share of the target mass, in [0, 1). A key without a target, so
    checked here; :class:`~galaxy_lightning.module.GalaxyClassifier` checks its argument with it
    too, for Python callers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"label_smoothing={value} must be in [0, 1)")
    return float(value)


def length_steps(length: Mapping[str, Any], batches_per_epoch: int) -> int:
    """The steps of a run whose length follows its data (``length={epochs: E, min_steps: S}``):
    E epochs of ``batches_per_epoch`` optimizer steps, at least S."""
    return max(int(length["min_steps"]), int(length["epochs"]) * batches_per_epoch)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for unknown keys, missing values, or invalid values of keys that
    have no ``_target_`` to check them, in a composed run config."""
    allowed = top_level_keys()
    unknown = sorted(set(cfg.keys()) - allowed)
    if unknown:
        raise ConfigError(f"unknown top-level config key '{unknown[0]}' (known: "
                          f"{', '.join(sorted(allowed - {'hydra'}))}); remove it or fix its spelling")
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' has no value (???); set it on the command "
                          f"line, e.g. {missing[0]}=...")
    for group in ("data", "model", "optimizer", "trainer"):
        _require(group in cfg and isinstance(cfg[group], DictConfig) and "_target_" in cfg[group],
                 f"config group '{group}' is missing or has no _target_; choose one, e.g. "
                 f"{group}=<name> (see conf/{group}/)")
        _check_keys(cfg[group], group, FILLED_IN.get(group, ()))
    if cfg.get("scheduler"):
        _require("_target_" in cfg.scheduler, "scheduler has no _target_; choose one: scheduler="
                 "none, cosine or onecycle (see conf/scheduler/)")
        _check_keys(cfg.scheduler, "scheduler", FILLED_IN["scheduler"])
    for group in ("logger", "callbacks"):
        for name in cfg.get(group) or {}:
            _check_keys(cfg[group]._get_node(name), f"{group}.{name}")

    perf = cfg.get("perf") or {}
    for key in perf:
        _require(key in perf_keys(), f"unknown config key 'perf.{key}' (known: "
                                     f"{', '.join(sorted(perf_keys()))}); remove it or fix its spelling")
    _require(perf.get("threads") is None or (isinstance(perf.threads, int) and perf.threads >= 1),
             f"perf.threads={perf.get('threads')} must be a positive integer or null")

    _require(isinstance(cfg.seed, int), f"seed={cfg.seed} must be an integer")
    _require(cfg.get("train", True) or cfg.get("ckpt_path") is not None,
             "train=false needs ckpt_path=<checkpoint> to test")
    # Lightning accepts 0 steps and a validation interval of 0; neither makes a run.
    max_steps = cfg.trainer.get("max_steps", -1)
    _require(isinstance(max_steps, int) and (max_steps == -1 or max_steps >= 1),
             f"trainer.max_steps={max_steps} must be -1 (no limit) or a positive integer")
    length = cfg.get("length")
    _require(length is None or (isinstance(length, DictConfig) and set(length) == {"epochs", "min_steps"}
                                and isinstance(length.epochs, int) and length.epochs >= 1
                                and isinstance(length.min_steps, int) and length.min_steps >= 0),
             f"length={OmegaConf.to_container(length) if isinstance(length, DictConfig) else length} "
             "must be null or {epochs: E, min_steps: S} with E >= 1 and S >= 0, e.g. "
             "'length={epochs: 30, min_steps: 1500}'")
    max_epochs = cfg.trainer.get("max_epochs", -1)
    _require(max_steps != -1 or length is not None or (isinstance(max_epochs, int) and max_epochs >= 1),
             "trainer.max_steps=-1 with length=null and no trainer.max_epochs: the run has no end; "
             "set trainer.max_steps=N, or length={epochs: E, min_steps: S}")
    interval = cfg.trainer.get("val_check_interval", None)
    _require(interval is None or (isinstance(interval, (int, float)) and interval > 0),
             f"trainer.val_check_interval={interval} must be positive")
    # torch accepts a momentum of 1 or more, which never forgets a gradient: the steps grow
    # without bound and the run ends in NaN
    momentum = cfg.optimizer.get("momentum")
    _require(momentum is None or (isinstance(momentum, (int, float)) and 0 <= momentum < 1),
             f"optimizer.momentum={momentum} must be in [0, 1): at 1 or above every past gradient "
             "keeps its weight and the steps grow without bound")
    # checked before any data is prepared, with the checks of the code that takes them
    check_label_smoothing(cfg.get("label_smoothing", 0.0))
    check_task(resolved(cfg.get("task")))
    with config_key("perf"):
        check_matmul_precision(perf.get("matmul_precision"))
    for key in ("tta", "calibrate", "train", "test"):
        _require(isinstance(cfg.get(key, False), bool), f"{key}={cfg.get(key)} must be true or false")
