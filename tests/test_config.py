"""Every config group composes and instantiates; bad configs fail before training with one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from galaxy_lightning.config import construct, perf_keys, top_level_keys, validate_config
from galaxy_lightning.errors import ConfigError
from galaxy_lightning.train import build_and_prepare, main

from .cli import Result, in_process

ROOT = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    """The choices of a config group (``_*.yaml`` files are shared parts, not choices)."""
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group", ["data", "model", "optimizer", "scheduler", "trainer", "logger",
                                   "callbacks"])
def test_every_option_of_every_group_composes_and_instantiates(
        group: str, make_cfg: Callable[..., DictConfig]) -> None:
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        extra = {("data", "hdf5"): ["data.source.path=mine.h5"],
                 ("data", "catalog"): ["data.source.catalog=mine.csv", "data.source.image_columns=[f]",
                                       "data.source.label_column=y"]}.get((group, option), [])
        cfg = make_cfg(f"{group}={option}", *extra, tiny=False)
        validate_config(cfg)
        node = cfg[group]
        if group == "model":
            net = construct(node, "model", in_channels=3, num_classes=7, image_size=96)
            assert net(torch.zeros(2, 3, 96, 96)).shape == (2, 7)
        elif group == "optimizer":
            opt = construct(node, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])
            assert isinstance(opt, torch.optim.Optimizer)
        elif group == "scheduler":
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            if option == "none":
                assert not node
            else:
                assert construct(node, "scheduler", optimizer=opt).last_epoch == 0
        elif group == "trainer":
            assert construct(node, "trainer", accelerator="cpu").max_steps == node.max_steps
        elif group in ("logger", "callbacks"):
            assert all(construct(v, group) is not None for v in (node or {}).values() if v is not None)
        else:
            assert construct(node, "data").batch_size == node.batch_size


@pytest.mark.parametrize("option", options("experiment") + [f"debug/{d}" for d in options("debug")]
                         + [f"perf/{p}" for p in options("perf")]
                         + [f"hparams_search/{h}" for h in options("hparams_search")])
def test_experiments_and_debug_presets_compose(option: str, make_cfg: Callable[..., DictConfig]) -> None:
    group, name = option.split("/") if "/" in option else ("experiment", option)
    cfg = make_cfg(f"{group}={name}", tiny=False)
    validate_config(cfg)
    # every preset ends: a step or epoch limit, or a length set from its data
    assert cfg.trainer.max_steps >= 1 or cfg.trainer.max_epochs >= 1 or cfg.get("length")


def test_quickstart_preset_builds_everything(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("experiment=quickstart", "data.source.n_per_class=10",
                   "data.splits=[40,15,15]", tiny=False)
    datamodule, module, trainer = build_and_prepare(cfg)
    assert trainer.max_steps == 400 and datamodule.batch_size == 200
    assert sum(p.numel() for p in module.parameters()) == 2729


@pytest.mark.parametrize("length, steps", [("{epochs: 3, min_steps: 5}", 3 * 7),
                                           ("{epochs: 3, min_steps: 50}", 50)])
def test_a_run_length_in_epochs_follows_the_training_set(
        length: str, steps: int, make_cfg: Callable[..., DictConfig]) -> None:
    """280 training images in batches of 40: 7 a epoch; the schedule is sized to the same."""
    cfg = make_cfg("trainer.max_steps=-1", f"length={length}", "scheduler=cosine")
    datamodule, module, trainer = build_and_prepare(cfg)
    assert trainer.max_steps == steps
    assert module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0](steps) == 0
    fixed = make_cfg("trainer.max_steps=20", f"length={length}")  # a step count wins
    assert build_and_prepare(fixed)[2].max_steps == 20
    # an epoch limit (debug=default's one epoch) ends the run first, and the schedule with it
    one_epoch = make_cfg("trainer.max_steps=-1", "trainer.max_epochs=1", f"length={length}")
    assert build_and_prepare(one_epoch)[2].max_steps == 7


def refuse(cfg: DictConfig) -> None:
    """Everything a run checks before its first training step: the config, then each target's
    own checks as it is built (data, model, trainer), then the optimizer and its schedule."""
    validate_config(cfg)
    _, module, _ = build_and_prepare(cfg)
    module.configure_optimizers()


@pytest.mark.parametrize("override, message", [
    ("+model.dropout=0.5", "unknown config key 'model.dropout'"),
    ("+data.source.colour=1", "unknown config key 'data.source.colour'"),
    ("+foo=1", "unknown top-level config key 'foo'"),
    ("+model.num_classes=3", "model.num_classes is set from the data"),
    ("data.batch_size=0", "data: batch_size=0 must be a positive integer"),
    ("optimizer.lr=-0.001", "optimizer: torch.optim.Adam rejects its settings: Invalid learning "
                            "rate: -0.001"),
    ("+optimizer.betas=[0.9,1.5]", "rejects its settings"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.precision=17", "trainer: Precision 17 is invalid"),
    ("model.width=0", "model: width=0 must be positive"),
    ("+length={epochs: 0, min_steps: 10}", "length={'epochs': 0, 'min_steps': 10} must be null or"),
    ("+length={epochs: 3}", "must be null or {epochs: E, min_steps: S}"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 with length=null and no trainer.max_epochs: "
                             "the run has no end"),
])
def test_bad_configs_are_refused_with_one_line(override: str, message: str,
                                              make_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        refuse(make_cfg(override))
    assert "\n" not in str(err.value)


def test_allowed_keys_come_from_the_config_files() -> None:
    primary = OmegaConf.load(ROOT / "conf" / "train.yaml")
    groups = {next(iter(e)).split()[-1] for e in primary.defaults if isinstance(e, DictConfig)}
    assert top_level_keys() == {k for k in primary if k != "defaults"} | groups | {"hydra"}
    assert "local" in top_level_keys() and "optional local" not in top_level_keys()
    assert perf_keys() == set(OmegaConf.load(ROOT / "conf" / "perf" / "default.yaml"))


def run_cli(*args: str, tmp_path: Path) -> Result:
    """``train.py args`` through the command line's own boundary, in this process (the process
    boundary itself is tested once, in test_faults.py)."""
    return in_process(main, *args, f"paths.data_dir={tmp_path / 'data'}",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})


def test_cli_refuses_bad_values_before_training(tmp_path: Path) -> None:
    result = run_cli("data=synthetic", "data.batch_size=0", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: data: batch_size=0 must be a positive integer"
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "data").exists()  # refused before any data was simulated


def test_cli_refuses_bad_optimizer_settings_before_the_first_step(tmp_path: Path) -> None:
    from .conftest import TINY

    result = run_cli(*TINY, "optimizer.lr=-1", tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: optimizer: torch.optim.Adam rejects its settings: Invalid learning rate: -1")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_default_without_galaxy10_says_where_to_put_it(tmp_path: Path) -> None:
    result = run_cli("data.source.download=false", tmp_path=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Galaxy10_DECals.h5" in last and "data=synthetic" in last
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_unknown_key_is_a_hydra_error_without_traceback(tmp_path: Path) -> None:
    result = run_cli("model.chanels=[4,5,6,7]", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "model.chanels" in result.stderr and "Traceback" not in result.stderr


def test_trainer_configs_for_every_machine(make_cfg: Callable[..., DictConfig]) -> None:
    expected = {"cpu": ("cpu", None), "gpu": ("gpu", None), "mps": ("mps", None),
                "ddp": ("auto", "ddp"), "ddp_sim": ("cpu", "ddp"), "default": ("auto", None)}
    assert set(options("trainer")) == set(expected)
    for name, (accelerator, strategy) in expected.items():
        cfg = make_cfg(f"trainer={name}", "trainer.precision=bf16-mixed", tiny=False)
        assert cfg.trainer.accelerator == accelerator and cfg.trainer.get("strategy") == strategy
        assert cfg.trainer.precision == "bf16-mixed"  # precision is a key of every trainer config
    assert make_cfg("trainer=ddp_sim", tiny=False).trainer.devices == 2


def test_callbacks_as_template_users_type_them(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("callbacks.early_stopping.patience=3", tiny=False)
    assert cfg.callbacks.early_stopping.patience == 3
    cfg = make_cfg("callbacks=[default,rich_model_summary,ema]", tiny=False)
    assert {"rich_model_summary", "ema", "bn_statistics", "lr_monitor", "model_checkpoint"} <= set(cfg.callbacks)
    assert list(cfg.callbacks).index("ema") < list(cfg.callbacks).index("bn_statistics")
    for name in options("callbacks"):
        validate_config(make_cfg(f"callbacks={name}", tiny=False))
    from galaxy_lightning.callbacks import LineProgressBar, progress_bar

    assert isinstance(progress_bar(7), LineProgressBar)  # pytest's stdout is not a terminal


def test_tags_and_the_local_config_group(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("tags=[baseline,dr5]", tiny=False)
    assert list(cfg.tags) == ["baseline", "dr5"] and list(cfg.callbacks.run_artifacts.tags) == list(cfg.tags)
    assert "local" not in cfg  # optional: absent until a conf/local/default.yaml exists
    assert (ROOT / "conf" / "local").is_dir() and "/conf/local/*.yaml" in (ROOT / ".gitignore").read_text()
