"""The recipe profile of the benchmark: a run's timings.json, and the phases it is grouped into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from galaxy_lightning.bench import recipe_profile
from galaxy_lightning.train import train


@pytest.mark.slow
def test_a_profiled_run_accounts_for_its_whole_time(tmp_path: Path, make_cfg: object) -> None:
    # the recipe's callbacks (EMA from step 10, BatchNorm statistics) on the tiny data
    cfg = make_cfg("trainer.profiler=simple", "callbacks=[default,ema]",  # type: ignore[operator]
                   "callbacks.ema.update_starting_at_step=10", "tta=true", "calibrate=true")
    train(cfg)
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert set(timings["phases_s"]) == {"setup", "fit", "load_and_calibrate", "test", "loggers",
                                        "report"}
    profile = timings["profile"]
    assert profile["run_training_batch"]["calls"] == 20
    assert profile["[Callback]BatchNormStatistics.on_validation_epoch_start"]["calls"] >= 2
    rows = recipe_profile(timings, steps=20, validations=2, ema_start=10, full_steps=20,
                          full_validations=2, wall_s=timings["total_s"] + 3.0)
    by_phase = {r["phase"]: r["seconds"] for r in rows}
    # every second of the process in exactly one phase: no timed action inside another one
    assert sum(by_phase.values()) == pytest.approx(timings["total_s"] + 3.0)
    assert min(by_phase.values()) > -0.05, by_phase
    assert by_phase["EMA of the weights: updates"] > 0
    assert by_phase["BatchNorm statistics before validation"] > 0
    assert by_phase["test forward (TTA: 8 views)"] > 0
    # at the profiled length the projection is the measurement; longer runs scale what grows
    assert [r["projected_s"] for r in rows] == pytest.approx([r["seconds"] for r in rows])
    longer = recipe_profile(timings, 20, 2, 10, full_steps=210, full_validations=20,
                            wall_s=timings["total_s"] + 3.0)
    scale = {r["phase"]: r["projected_s"] / r["seconds"] for r in longer if r["seconds"] > 0}
    assert scale["training steps (forward, backward, optimizer)"] == pytest.approx(209 / 19)
    assert scale["BatchNorm statistics before validation"] == pytest.approx(21 / 3)
    assert scale["EMA of the weights: updates"] == pytest.approx(200 / 10)
    assert scale["first training step (compilation included)"] == 1.0


def test_a_run_without_the_profiler_still_records_its_phases(tiny_run: tuple) -> None:
    timings = json.loads((tiny_run[0].parent.parent / "timings.json").read_text())
    assert "profile" not in timings
    assert timings["phases_s"]["fit"] > 0 and timings["total_s"] >= sum(timings["phases_s"].values())
