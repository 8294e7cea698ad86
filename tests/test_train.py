"""End to end through galaxy_lightning.train.train: learning, outputs, reproducibility, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from galaxy_lightning.train import build, train

LEARNS = [  # small enough for the fast suite, long enough for the tutorial CNN to learn
    "data.source.n_per_class=200", "data.source.image_size=48", "data.splits=[1000,200,200]",
    "data.batch_size=100", "data.eval_batch_size=200", "optimizer.lr=0.003",
    "trainer.max_steps=300", "trainer.val_check_interval=100", "trainer.log_every_n_steps=10",
]


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_short_run_learns_and_its_outputs_agree(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(*LEARNS)
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    chance = 1 / 7
    assert metrics["test/acc"] > 0.35 > 2 * chance
    assert metrics["val/acc_best"] > 0.35

    for name in ("accuracy_curve.png", "confusion_matrix.png", "examples.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file()
    import torch

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 300  # the latest validation, not the best one
    best = json.loads((run / "metrics.json").read_text())
    cm = np.array(best["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == 200
    assert best["test_acc"] == pytest.approx(np.trace(cm) / cm.sum())
    assert best["test_acc"] == pytest.approx(metrics["test/acc"])
    per_class = np.diag(cm) / cm.sum(1)
    assert list(best["test_acc_per_class"].values()) == pytest.approx(per_class.tolist())
    assert best["history"]["val_step"] == [100, 200, 300]
    assert best["val_acc_best"] == pytest.approx(max(best["history"]["val_acc"]))
    assert best["val_acc_best"] == pytest.approx(metrics["val/acc_best"])
    assert Path(best["checkpoint"]).is_file()
    assert f"step{best['best_step']:05d}" in Path(best["checkpoint"]).name

    tb = events(run)
    tags = tb.Tags()
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc",
                "val/acc_class/merging", "test/acc_class/edge_on_with_bulge"):
        assert tag in tags["scalars"], tag
    for tag in ("test/confusion_matrix", "data/examples", "curves/accuracy"):
        assert tag in tags["images"], tag
    # Lightning logs at the index of the last batch (global_step - 1); metrics.json counts steps.
    assert [e.step for e in tb.Scalars("val/acc")] == [99, 199, 299]
    assert [e.value for e in tb.Scalars("val/acc")] == pytest.approx(best["history"]["val_acc"])
    assert [e.value for e in tb.Scalars("train/acc")] == pytest.approx(best["history"]["train_acc"])
    assert tb.Scalars("test/acc")[-1].value == pytest.approx(best["test_acc"])
    assert len(tb.Scalars("train/loss")) == 30  # every log_every_n_steps=10


def test_same_seed_gives_identical_metrics(make_cfg: Callable[..., DictConfig]) -> None:
    results = []
    for run in ("a", "b"):
        cfg = make_cfg(run=run)
        train(cfg)
        m = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
        m.pop("checkpoint")
        assert m.pop("fit_seconds") > 0  # wall time: the one thing that may differ
        results.append(m)
    assert results[0] == results[1]
    assert results[0]["history"]["val_step"] == [10, 20]


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == 15:
            raise RuntimeError("simulated kill")


def test_resume_continues_a_killed_run_to_the_same_end(make_cfg: Callable[..., DictConfig]) -> None:
    whole = make_cfg(run="whole")
    train(whole)
    reference = json.loads((Path(whole.paths.output_dir) / "metrics.json").read_text())

    killed = make_cfg(run="killed")
    datamodule, module, trainer = build(killed)
    trainer.callbacks.append(_Crash())
    with pytest.raises(RuntimeError, match="simulated kill"):
        trainer.fit(module, datamodule=datamodule)
    last = Path(killed.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()

    resumed = make_cfg(f"ckpt_path={last}", run="resumed")
    metrics = train(resumed)
    result = json.loads((Path(resumed.paths.output_dir) / "metrics.json").read_text())
    assert result["global_step"] == reference["global_step"] == 20
    # The curve continues the killed run's history: the validation before the kill (step 10, in
    # last.ckpt) is kept exactly, and the resumed run adds the one at step 20.
    assert result["history"]["val_step"] == reference["history"]["val_step"] == [10, 20]
    assert result["history"]["val_acc"][0] == reference["history"]["val_acc"][0]
    assert result["history"]["train_acc"][0] == reference["history"]["train_acc"][0]
    assert 0.0 <= result["test_acc"] <= 1.0
    assert metrics["val/acc_best"] == pytest.approx(max(result["history"]["val_acc"]))
