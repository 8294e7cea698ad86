"""Performance modes: the allocator setting, the StepTimer, and fast mode's accuracy parity."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from galaxy_lightning.module import GalaxyClassifier
from galaxy_lightning.perf import tune_malloc
from galaxy_lightning.train import build, train


def test_tune_malloc_takes_effect_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting is glibc-specific")
    assert tune_malloc() is True


def test_step_timer_and_fast_mode_keep_checkpoints_compatible(
        make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    timing = tmp_path / "timing.json"
    cfg = make_cfg("perf=fast", "+callbacks.step_timer._target_=galaxy_lightning.callbacks.StepTimer",
                   f"+callbacks.step_timer.output_file={timing}", "+callbacks.step_timer.warmup_steps=5")
    metrics = train(cfg)
    summary = json.loads(timing.read_text())
    assert summary["steps"] == 20 and summary["compiled"] is True
    assert summary["precision"] == "bf16-mixed"
    assert summary["ms_per_step"] > 0 and summary["peak_rss_mb"] > 100
    assert 0 <= metrics["test/acc"] <= 1
    # A fast-mode checkpoint loads into a plain float32 module: same keys, no compiled wrapper.
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    module = GalaxyClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_mode_does_not_cost_accuracy(make_cfg: Callable[..., DictConfig], seed: int) -> None:
    """Same seed, 600 steps at the tutorial's learning rate: test accuracy of the final weights
    in fast mode (bf16 autocast + compile) within 1 point of float32, on 1,000 test images."""
    accs = {}
    for mode in ("default", "fast"):
        cfg = make_cfg(f"perf={mode}", "data.source.n_per_class=600", "data.source.image_size=48",
                       "data.splits=[2800,400,1000]", "data.batch_size=100",
                       "data.eval_batch_size=500", "trainer.max_steps=600",
                       "trainer.val_check_interval=100", "logger=none", f"seed={seed}", run=mode)
        L.seed_everything(seed, verbose=False)
        datamodule, module, trainer = build(cfg)
        trainer.fit(module, datamodule=datamodule)
        accs[mode] = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    assert accs["default"] > 0.4  # both learned
    assert abs(accs["fast"] - accs["default"]) < 0.01, accs
