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


def test_the_tutorial_comparison_alternates_its_runs_and_averages_the_rounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # the processes are replaced by their results: what is checked is the order and the arithmetic
    import argparse

    from galaxy_lightning import bench

    order: list[str] = []
    walls = {"tutorial": [100.0, 80.0], "f32": [60.0, 60.0], "fast": [50.0, 30.0],
             "bare": [50.0, 50.0], "bare-fast": [30.0, 30.0]}
    steps_ms = {"tutorial": [70.0, 50.0], "f32": [40.0, 40.0], "fast": [30.0, 20.0],
                "bare": [32.0, 32.0], "bare-fast": [20.0, 20.0]}

    def result(kind: str) -> dict:
        k = sum(1 for o in order if o == kind)
        order.append(kind)
        return {"ms_per_step": steps_ms[kind][k], "images_per_s": 1.0, "wall_s": walls[kind][k],
                "first_step_s": 1.0, "peak_rss_mb": 100.0 * (k + 1)}

    monkeypatch.setattr(bench, "_timed_process",
                        lambda cmd, res: result(cmd[cmd.index("--worker") + 1]))
    monkeypatch.setattr(bench, "_train_py_run", lambda args, data_dir, run_dir, steps, overrides:
                        result("fast" if "perf=fast" in overrides else "f32"))
    report: dict = {}
    args = argparse.Namespace(steps=1000, rounds=2, skip_prepare=True)
    bench._tutorial_runs(args, [], tmp_path / "sim.h5", tmp_path, tmp_path, report)
    assert order == ["tutorial", "f32", "fast", "bare", "bare-fast"] * 2
    runs = report["runs"]
    assert runs["tutorial loop (baseline)"]["ms_per_step"] == 60.0
    assert runs["train.py perf=fast"]["speedup"] == pytest.approx(60.0 / 25.0)
    assert runs["train.py perf=fast"]["speedup_wall"] == pytest.approx(90.0 / 40.0)
    assert runs["train.py float32"]["speedup_wall"] == pytest.approx(1.5)
    assert runs["train.py float32"]["peak_rss_mb"] == 200.0  # the largest round, not the mean
    assert len(runs["train.py float32"]["rounds"]) == 2
    printed = capsys.readouterr().out
    assert "mean of 2 alternated round(s)" in printed
    # train.py's step against the bare loop's in the same mode: what the Trainer costs
    assert "the Trainer's cost per step over the bare loop, float32: 8.0 ms (25%)" in printed
    assert "the Trainer's cost per step over the bare loop, perf=fast: 5.0 ms (25%)" in printed


def test_the_benchmark_refuses_zero_rounds(capsys: pytest.CaptureFixture) -> None:
    from galaxy_lightning import bench

    with pytest.raises(SystemExit) as stop:
        bench.main(["--rounds", "0"])
    assert stop.value.code == 2
    assert "--rounds 0 --steps 1000: both must be at least 1" in capsys.readouterr().err


def test_the_recipe_projection_follows_the_runs_length() -> None:
    from omegaconf import OmegaConf

    from galaxy_lightning.bench import recipe_steps

    fixed = OmegaConf.create({"trainer": {"max_steps": 6000}, "length": None})
    assert recipe_steps(fixed) == 6000
    # 10,000 training images of the default split in batches of 128: 78 full batches per epoch
    by_data = OmegaConf.create({"trainer": {"max_steps": -1}, "data": {"batch_size": 128},
                                "length": {"epochs": 77, "min_steps": 1500}})
    assert recipe_steps(by_data) == 77 * 78
    by_data.length.epochs = 5
    assert recipe_steps(by_data) == 1500  # the floor
