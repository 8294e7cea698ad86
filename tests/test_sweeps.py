"""Hydra multirun sweeps: grid, Optuna search, parallel joblib jobs; the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from galaxy_lightning.optuna_sweeper import ResumeStudy
from galaxy_lightning.sweep import (SweepSummary, group_by_config, markdown_table,
                                    question_comparison, question_table, summary_statistics, t975,
                                    write_summary)
from galaxy_lightning.train import main

from .cli import Forked, Result, in_process
from .conftest import TINY, compose_run

ROOT = Path(__file__).resolve().parents[1]


def command(*args: str, sweep_dir: Path, data_dir: Path) -> list[str]:
    """The arguments of ``train.py -m``: a sweep of tiny runs into ``sweep_dir``."""
    return ["-m", *TINY, *args, f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep_dir}"]


def multirun(*args: str, sweep_dir: Path, data_dir: Path) -> Result:
    """``train.py -m TINY args`` in this process (Hydra's launchers start the jobs: in this
    process too for the basic one, in worker processes for joblib)."""
    result = in_process(main, *command(*args, sweep_dir=sweep_dir, data_dir=data_dir), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def summary(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(sweep_dir / "summary.csv")))


@pytest.mark.slow
def test_grid_sweeps_give_separate_runs_and_a_summary_per_launch(tmp_path: Path,
                                                                 data_dir: Path) -> None:
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
    first = {r["run_dir"] for r in rows}
    # <job number>_<launch time>: one time for all the jobs of a launch
    assert len({Path(d).name.split("_", 1)[1] for d in first}) == 1

    def written(jobs: set[str]) -> list[tuple[Path, int]]:
        return sorted((f, f.stat().st_mtime_ns) for job in jobs for f in Path(job).glob("**/*"))

    before = written(first)

    # A second, smaller launch into the same directory: new job directories, and a summary of
    # its own job only (job 0 does not overwrite the first launch's job 0, nor inherit job 1).
    multirun("optimizer.lr=0.003", sweep_dir=sweep, data_dir=data_dir)
    (row,) = summary(sweep)
    assert "optimizer.lr=0.003" in row["all_overrides"].split() and row["status"] == "done"
    assert row["run_dir"] not in first and Path(row["run_dir"]).name.startswith("0_")
    assert len([p for p in sweep.iterdir() if (p / ".hydra").is_dir()]) == 3
    # the first launch's jobs are untouched (no TensorBoard events piled up in a reused directory)
    assert written(first) == before


def test_the_summary_holds_the_jobs_this_launch_wrote(tmp_path: Path) -> None:
    """Also when a launch reuses job directories (hydra.sweep.subdir=${hydra.job.num})."""
    def job(name: str, lr: str) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n")
        (tmp_path / name / ".hydra" / "config.yaml").write_text(f"lr: {lr}\n")

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {}}})
    job("0", "0.1"), job("1", "0.2"), job("2", "0.3")  # an earlier launch of three jobs
    callback = SweepSummary(launch="12-00-00_000000")
    callback.on_multirun_start(config)
    time.sleep(0.01)
    job("0", "0.4"), job("3_12-00-00_000000", "0.5")  # this launch: one reused, one new
    callback.on_multirun_end(config)
    assert sorted(r["all_overrides"] for r in summary(tmp_path)) == ["optimizer.lr=0.4",
                                                                   "optimizer.lr=0.5"]
    # a stored (Optuna) study continues over launches: its summary holds every launch's jobs
    config.hydra.sweeper.storage = f"sqlite:///{tmp_path}/optuna.db"
    callback.on_multirun_end(config)
    assert len(summary(tmp_path)) == 4


@pytest.mark.slow
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


@pytest.mark.slow
def test_parallel_joblib_sweep_shares_the_cores(tmp_path: Path, data_dir: Path) -> None:
    sweep = tmp_path / "joblib"
    multirun("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", sweep_dir=sweep,
             data_dir=data_dir)
    rows = summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    expected = max(1, (os.cpu_count() or 1) // 2)
    for row in rows:
        log = (Path(row["run_dir"]) / "train.log").read_text()
        assert f", {expected} threads," in log


def test_slurm_launcher_config_composes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_run(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path / "run", tmp_path)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)
    # SIGUSR1 before the limit, submitit's own requeueing off: in a SLURM job the run's
    # GracefulStop saves between steps and requeues, and Lightning's own requeue (a mid-step
    # hpc_ckpt) is off
    assert launcher.additional_parameters.signal == "USR1@120" and launcher.max_num_timeout == 0
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from galaxy_lightning.callbacks import GracefulStop
    from galaxy_lightning.train import build, trainer_plugins

    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "galaxy",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    (environment,) = [p for p in trainer_plugins() if isinstance(p, SLURMEnvironment)]
    assert not environment.auto_requeue
    _, trainer = build(cfg)  # objects only: no data is touched
    assert any(isinstance(c, GracefulStop) for c in trainer.callbacks)


@pytest.mark.slow
def test_seed_sweep_from_any_directory_gives_the_comparison_table(tmp_path: Path,
                                                                   data_dir: Path) -> None:
    # No hydra.sweep.dir: the default logs/<task>/multiruns/<time> under the launch directory.
    result = in_process(main, "-m", *[o for o in TINY if not o.startswith("seed=")],
                        "model.width=1,2", "seed=0,1", f"paths.data_dir={data_dir}", "logger=none",
                        cwd=tmp_path)
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
                "fit_minutes": 2.0, "val/acc_best": acc + 0.01}
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
    assert (b["val/acc_best_mean"], b["val/acc_best_max"]) == pytest.approx((0.93, 0.95))
    assert (b["test/acc_ci95_low"], b["test/acc_ci95_high"]) == pytest.approx(
        (0.92 - 4.303 * 0.02 / 3 ** 0.5, 0.92 + 4.303 * 0.02 / 3 ** 0.5))
    table = markdown_table(groups)
    assert "| experiment=a | 100 | 2.0 | 72.0% ± 2.8 [46.6-97.4] | 0.030 ± 0.014 [-0.097-0.157] |" in table
    assert "| experiment=b | 100 | 2.0 | 92.0% ± 2.0 [87.0-97.0] |" in table


def test_student_t_beyond_the_table_tends_to_the_normal() -> None:
    assert (t975(1), t975(30)) == (12.706, 2.042)
    assert t975(40) == pytest.approx(2.021, abs=1e-3) and t975(120) == pytest.approx(1.980, abs=1e-3)
    assert t975(10**6) == pytest.approx(1.96, abs=1e-5)
    values = [float(i % 2) for i in range(41)]  # 40 degrees of freedom
    stats = summary_statistics(values)
    half = stats["ci95_high"] - stats["mean"]
    assert half == pytest.approx(t975(40) * stats["std"] / 41 ** 0.5)


def _optuna_config(tmp_path: Path, n_trials: int, study_name: str | None = "s") -> DictConfig:
    return OmegaConf.create({"hydra": {"sweeper": {
        "storage": f"sqlite:///{tmp_path}/optuna.db", "study_name": study_name,
        "n_trials": n_trials, "sampler": {"seed": 1234}}}})


def test_resuming_a_study_fails_stale_trials_and_runs_the_rest(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    import optuna

    config = _optuna_config(tmp_path, 5)
    ResumeStudy().on_multirun_start(config)  # no study yet: nothing to change, nothing created
    assert config.hydra.sweeper.n_trials == 5 and not (tmp_path / "optuna.db").exists()
    study = optuna.create_study(study_name="s", storage=config.hydra.sweeper.storage)
    for value in (0.5, 0.6):
        study.tell(study.ask(), value)
    study.ask()  # a trial whose process was killed: RUNNING for ever
    OmegaConf.set_readonly(config.hydra, True)  # as Hydra has it
    ResumeStudy().on_multirun_start(config)
    study = optuna.load_study(study_name="s", storage=config.hydra.sweeper.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert config.hydra.sweeper.n_trials == 3 and config.hydra.sweeper.sampler.seed == 1234 + 3
    done = _optuna_config(tmp_path, 2)
    ResumeStudy().on_multirun_start(done)
    assert done.hydra.sweeper.n_trials == 0  # finished: nothing more to run
    with pytest.raises(SystemExit) as exit_:  # a ConfigError, as one line
        ResumeStudy().on_multirun_start(_optuna_config(tmp_path, 2, study_name=None))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: hydra.sweeper.storage=sqlite:")


def _trial_states(db: Path) -> dict[int, str]:
    if not db.is_file():
        return {}
    with sqlite3.connect(db, timeout=10) as con:
        try:
            return dict(con.execute("SELECT number, state FROM trials").fetchall())
        except sqlite3.OperationalError:  # the tables are not there yet
            return {}


@pytest.mark.slow
def test_a_killed_optuna_search_continues_with_the_remaining_trials(tmp_path: Path,
                                                                    data_dir: Path) -> None:
    import optuna

    sweep = tmp_path / "optuna"
    args = ("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2")
    # the first launch is killed (SIGKILL: nothing can clean up) while its second trial runs
    # (a process of its own: the basic launcher runs the trials in it)
    first = Forked(*command(*args, sweep_dir=sweep, data_dir=data_dir), cwd=ROOT)
    deadline = time.monotonic() + 600
    while (_trial_states(sweep / "optuna.db") != {0: "COMPLETE", 1: "RUNNING"}
           or not list(sweep.glob("1_*/.hydra/config.yaml"))):  # the second job has started
        assert first.process.is_alive(), first.wait(5).stderr[-3000:]
        assert time.monotonic() < deadline, _trial_states(sweep / "optuna.db")
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60).returncode == -signal.SIGKILL

    multirun(*args, sweep_dir=sweep, data_dir=data_dir)  # the same command: one trial is left
    study = optuna.load_study(study_name="galaxy_lightning", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    # a larger n_trials extends the finished search by the difference
    multirun(*args, "hydra.sweeper.n_trials=3", sweep_dir=sweep, data_dir=data_dir)
    study = optuna.load_study(study_name="galaxy_lightning", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    # the summary covers the whole search: every launch's jobs, each in its own directory
    rows = summary(sweep)
    assert len(rows) == 4 and len({r["run_dir"] for r in rows}) == 4
    assert sorted(r["status"] for r in rows) == ["done", "done", "done", "no metrics.json"]
    assert max(float(r["val/acc_best"]) for r in rows if r["val/acc_best"]) == \
        pytest.approx(study.best_value)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(study.best_value)


def _job_config(overrides: list[str], master: DictConfig, num: int) -> DictConfig:
    """A sweep job's config as Hydra's launcher makes it: composed again, with the launching
    config's resolver cache, its job number and its output directory."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.job.num = num
        cfg.hydra.runtime.output_dir = f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_sweep_job_has_its_own_directory_and_logger_run_names(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from galaxy_lightning.config import CONFIG_PACKAGE

    overrides = ["logger=many", f"paths.log_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
            master = compose("train", overrides=overrides, return_hydra_config=True)
            launch = master.hydra.callbacks.sweep_summary.launch  # as Hydra builds the callback
            jobs = []
            for num in (0, 1):
                time.sleep(0.002)  # a job resolving its own time would get another one
                jobs.append(_job_config(overrides, master, num))
            names = set()
            for num, cfg in enumerate(jobs):
                HydraConfig.instance().set_config(cfg)
                output_dir = cfg.hydra.runtime.output_dir
                assert output_dir == f"{tmp_path}/sweep/{num}_{launch}"
                assert cfg.logger.mlflow.run_name == cfg.logger.wandb.name == output_dir
                names.add(cfg.logger.mlflow.run_name)
            assert len(names) == 2
            run = compose("train", overrides=overrides[:2], return_hydra_config=True)
            with read_write(run.hydra):
                run.hydra.runtime.output_dir = run.hydra.run.dir
            HydraConfig.instance().set_config(run)
            assert run.logger.mlflow.run_name == run.logger.wandb.name == run.hydra.run.dir
            assert "/runs/" in run.logger.mlflow.run_name
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_sweeps_started_together_never_share_a_directory(tmp_path: Path, data_dir: Path) -> None:
    args = ["-m", *TINY, "seed=1,2", "logger=none", f"paths.data_dir={data_dir}",
            f"paths.log_dir={tmp_path / 'logs'}", "print_config=false"]
    # two processes of their own, started together (forked from the preloaded server)
    processes = [Forked(*args, cwd=ROOT) for _ in range(2)]
    for p in processes:
        result = p.wait(timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 2
    for sweep in sweeps:  # each summary holds its own two jobs, never the other sweep's
        rows = summary(sweep)
        assert len(rows) == 2 and all(Path(r["run_dir"]).parent == sweep for r in rows)


def test_a_tree_sweep_compares_every_question_with_each_question_alone(tmp_path: Path) -> None:
    # Job directories as a `task.questions=null,[bar],[merging]` x `seed=0,1` sweep leaves them.
    def job(n: int, questions: str, seed: int, bar: tuple[float, float],
            merging: tuple[float, float]) -> None:
        hydra = tmp_path / f"{n}_12-00-00_000000" / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(yaml.safe_dump(
            ["task=decision_tree", f"task.questions={questions}", f"seed={seed}"]))
        learned = None if questions == "null" else [questions.strip("[]")]
        (hydra / "config.yaml").write_text(yaml.safe_dump(
            {"task": {"name": "decision_tree", "questions": learned},
             "data": {"source": {"tree": "gz_decals_dr5"}}}))
        metrics = {"test/acc": 0.5, "val/acc_best": 0.5}
        for q, (mae, acc) in (("bar", bar), ("merging", merging)):
            metrics |= {f"test/tree/{q}/mae": mae, f"test/tree/{q}/acc_confident": acc,
                        f"test/tree/{q}/n_confident": 40.0,
                        f"test/tree/{q}/calibration_error": mae / 4}
        (hydra.parent / "metrics.json").write_text(json.dumps(metrics))

    job(0, "null", 0, (0.10, 0.80), (0.05, 0.90))
    job(1, "[bar]", 0, (0.13, 0.75), (0.40, 0.20))
    job(2, "[merging]", 0, (0.30, 0.30), (0.05, 0.95))
    job(3, "null", 1, (0.12, 0.70), (0.06, float("nan")))  # no confident merger in this split
    job(4, "[bar]", 1, (0.16, 0.60), (0.40, 0.20))
    job(5, "[merging]", 1, (0.30, 0.30), (0.07, 0.85))
    rows, _ = write_summary(tmp_path)
    comparison = question_comparison(rows)
    # the tree's order (bar before merging), each question against the model of that question alone
    assert [c["question"] for c in comparison] == ["bar", "merging"]
    bar, merging = comparison
    assert bar["config"] == "task=decision_tree"
    assert bar["every_mae_mean"] == pytest.approx(0.11) and bar["alone_mae_mean"] == pytest.approx(0.145)
    # differences paired by seed: (0.13 - 0.10, 0.16 - 0.12); t(1 d.o.f.) = 12.706
    assert bar["difference_mae_mean"] == pytest.approx(0.035)
    assert bar["difference_mae_std"] == pytest.approx(0.005 * 2 ** 0.5)
    assert bar["difference_mae_ci95_low"] == pytest.approx(0.035 - 12.706 * 0.005)
    assert bar["difference_acc_confident_mean"] == pytest.approx(-0.075)
    assert bar["difference_calibration_error_mean"] == pytest.approx(0.035 / 4)  # in the CSV
    # a NaN accuracy (no confident galaxy) drops out of the mean and of the pairs
    assert merging["every_acc_confident_mean"] == pytest.approx(0.90)
    assert merging["difference_acc_confident_pairs"] == 1
    assert merging["difference_acc_confident_mean"] == pytest.approx(0.05)
    table = question_table(comparison)
    assert "| bar | 0.110 ± 0.014 | 0.145 ± 0.021 | +0.035 [-0.029, +0.099] | 75.0 ± 7.1 |" in table
    assert (tmp_path / "summary_questions.csv").is_file()
    # a sweep without single-question models has no such table (and no stale file)
    for n in (1, 2, 4, 5):
        (tmp_path / f"{n}_12-00-00_000000" / "metrics.json").unlink()
    rows, _ = write_summary(tmp_path)
    assert question_comparison(rows) == [] and not (tmp_path / "summary_questions.csv").exists()
