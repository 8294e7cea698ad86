"""Shared fixtures: composed run configs that train in seconds on a small cached synthetic set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

#: A run that exercises every part of a real one in a few seconds: 32 px simulated galaxies,
#: 20 steps, validation every 10.
TINY = [
    "data=synthetic",
    "data.source.n_per_class=60",
    "data.source.image_size=32",
    "data.splits=[280,70,70]",
    "data.batch_size=40",
    "data.eval_batch_size=70",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
    "seed=0",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the session, so simulated sets are generated once."""
    return tmp_path_factory.mktemp("data")


def compose_run(overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would, writing into output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.data_dir = str(data_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    """make_cfg(*overrides, run="run") -> a tiny run config writing into tmp_path/run."""

    def make(*overrides: str, run: str = "run", tiny: bool = True) -> DictConfig:
        return compose_run([*(TINY if tiny else []), *overrides], tmp_path / run, data_dir)

    yield make
    GlobalHydra.instance().clear()
