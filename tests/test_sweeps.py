"""Hydra multirun sweeps: grid, Optuna search, parallel joblib jobs; the SLURM launcher config."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from galaxy_lightning.sweep import group_by_config, markdown_table

from .conftest import TINY, compose_run

ROOT = Path(__file__).resolve().parents[1]


def multirun(*args: str, sweep_dir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *TINY, *args, f"paths.data_dir={data_dir}",
         f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def summary(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(sweep_dir / "summary.csv")))


def test_grid_sweep_gives_separate_runs_and_a_summary(tmp_path: Path, data_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    result = multirun("optimizer.lr=0.001,0.01", sweep_dir=sweep, data_dir=data_dir)
    rows = summary(sweep)
    assert sorted(r["overrides"] for r in rows) == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert all("trainer.max_steps=20" in r["all_overrides"] for r in rows)
    for row in rows:
        job = Path(row["run_dir"])
        assert row["status"] == "done" and 0 <= float(row["test/acc"]) <= 1
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))  # one TB run per job
        assert (job / "metrics.json").is_file()
    assert float(rows[0]["val/acc_best"]) >= float(rows[1]["val/acc_best"])  # sorted, best first
    assert "sweep summary" in result.stdout and "optimizer.lr=0.01" in result.stdout


def test_optuna_search_runs_three_trials(tmp_path: Path, data_dir: Path) -> None:
    sweep = tmp_path / "optuna"
    multirun("hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
             sweep_dir=sweep, data_dir=data_dir)
    rows = summary(sweep)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    for row in rows:
        assert all(key in row["all_overrides"] for key in
                   ("optimizer.lr=", "data.batch_size=", "model.width=", "data.augment="))
        assert "hparams_search=optuna" in row["all_overrides"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # train.py returns the best validation accuracy, and that is what Optuna maximised.
    assert best["best_value"] == pytest.approx(max(float(r["val/acc_best"]) for r in rows))


def test_parallel_joblib_sweep_shares_the_cores(tmp_path: Path, data_dir: Path) -> None:
    sweep = tmp_path / "joblib"
    multirun("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", sweep_dir=sweep,
             data_dir=data_dir)
    rows = summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    import os

    expected = max(1, (os.cpu_count() or 1) // 2)
    for row in rows:
        log = (Path(row["run_dir"]) / "train.log").read_text()
        assert f", {expected} threads," in log


def test_slurm_launcher_config_composes(tmp_path: Path) -> None:
    cfg = compose_run(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path / "run", tmp_path)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)
    # Lightning's SLURM requeue: SIGUSR1 before the limit, submitit's own requeueing off
    assert launcher.additional_parameters.signal == "USR1@120" and launcher.max_num_timeout == 0
    from lightning.fabric.plugins.environments import SLURMEnvironment

    assert SLURMEnvironment().auto_requeue and SLURMEnvironment().requeue_signal.name == "SIGUSR1"


def test_seed_sweep_from_any_directory_gives_the_comparison_table(tmp_path: Path,
                                                                   data_dir: Path) -> None:
    # No hydra.sweep.dir: the default logs/<task>/multiruns/<time> under the launch directory.
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *[o for o in TINY if not o.startswith("seed=")],
         "model.width=1,2", "seed=0,1",
         f"paths.data_dir={data_dir}", "logger=none"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = summary(sweep)
    groups = list(csv.DictReader(open(sweep / "summary_by_config.csv")))
    # one row per width; the label is every override but the seed (and paths.*: where, not what)
    assert len(groups) == 2
    for g, width in zip(groups, ("model.width=1", "model.width=2")):
        assert g["config"].endswith(f"{width} logger=none") and g["config"].startswith("data=synthetic")
        assert "seed=" not in g["config"] and "paths." not in g["config"]
        accs = [float(j["test/acc"]) for j in jobs if j["overrides"].startswith(width + " ")]
        assert g["runs"] == "2" and g["repeats"] == "seed=0, seed=1" and len(accs) == 2
        assert float(g["test/acc_mean"]) == pytest.approx(sum(accs) / 2)
        assert float(g["test/acc_min"]) == min(accs) and int(g["params"]) > 0
    assert "model.width=2 logger=none |" in result.stdout


def test_sweep_table_groups_seeds_and_folds() -> None:
    def row(job: int, overrides: str, acc: float, ece: float) -> dict:
        return {"job": str(job), "overrides": overrides, "all_overrides": overrides,
                "status": "done", "test/acc": acc, "test/ece": ece, "params": 100,
                "fit_minutes": 2.0, "val/acc_best": acc}
    rows = [row(0, "experiment=a seed=0 paths.data_dir=/d", 0.70, 0.02),
            row(1, "experiment=a seed=1 paths.data_dir=/d", 0.74, 0.04),
            row(2, "experiment=b data.fold=0 paths.data_dir=/d", 0.90, 0.01),
            row(3, "experiment=b data.fold=1 paths.data_dir=/d", 0.92, 0.03),
            row(4, "experiment=b data.fold=2 paths.data_dir=/d", 0.94, 0.02)]
    groups = group_by_config(rows)
    assert [g["config"] for g in groups] == ["experiment=a", "experiment=b"]
    a, b = groups
    assert a["test/acc_mean"] == pytest.approx(0.72) and a["repeats"] == "seed=0, seed=1"
    assert (b["test/acc_min"], b["test/acc_max"]) == (0.90, 0.94)
    assert b["repeats"] == "data.fold=0, data.fold=1, data.fold=2"
    # sample standard deviation and Student's t interval (t_0.975 with 2 d.o.f. = 4.303)
    assert b["test/acc_std"] == pytest.approx(0.02)
    assert (b["test/acc_ci95_low"], b["test/acc_ci95_high"]) == pytest.approx(
        (0.92 - 4.303 * 0.02 / 3 ** 0.5, 0.92 + 4.303 * 0.02 / 3 ** 0.5))
    table = markdown_table(groups)
    assert "| experiment=a | 100 | 2.0 | 72.0% ± 2.8 [46.6-97.4] | 0.030 ± 0.014 [-0.097-0.157] |" in table
    assert "| experiment=b | 100 | 2.0 | 92.0% ± 2.0 [87.0-97.0] |" in table


def test_an_interrupted_optuna_search_continues_in_its_sweep_directory(tmp_path: Path,
                                                                      data_dir: Path) -> None:
    import optuna

    sweep = tmp_path / "optuna"
    args = ("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2")
    multirun(*args, sweep_dir=sweep, data_dir=data_dir)
    multirun(*args, sweep_dir=sweep, data_dir=data_dir)  # the same command again: continues
    study = optuna.load_study(study_name="galaxy_lightning", storage=f"sqlite:///{sweep}/optuna.db")
    assert len(study.trials) == 4 and all(t.value is not None for t in study.trials)
    rows = summary(sweep)
    assert len(rows) == 4 and len({r["run_dir"] for r in rows}) == 4  # no job overwrote another
    assert max(float(r["val/acc_best"]) for r in rows) == pytest.approx(study.best_value)


def test_sweeps_started_together_never_share_a_directory(tmp_path: Path, data_dir: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, "seed=1,2", "logger=none",
               f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'logs'}", "print_config=false"]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
                 for _ in range(2)]
    for p in processes:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-3000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 2
    for sweep in sweeps:  # each summary holds its own two jobs, never the other sweep's
        rows = summary(sweep)
        assert len(rows) == 2 and all(Path(r["run_dir"]).parent == sweep for r in rows)
