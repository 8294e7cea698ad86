"""The summary of a Hydra multirun: one row per job with its overrides and results.

Hydra calls :class:`SweepSummary` when a sweep ends (``conf/hydra/default.yaml`` registers it).
It reads every job's ``.hydra/overrides.yaml`` and ``metrics.json`` and writes
``summary.csv`` into the sweep directory, sorted by best validation accuracy, and prints it.
When the sweep repeats configurations over seeds (``seed=0,1,2``) or cross-validation folds
(``data.fold=0,1,2,3,4``), it also writes ``summary_by_config.csv`` and prints a Markdown table
with one row per configuration: the model's parameters, training minutes, and test accuracy and
ECE as mean, standard deviation, a 95% confidence interval of the mean (Student's t), min and max
over the repeats.

A sweep of decision-tree runs (``task=decision_tree``) that varies ``task.questions`` also gets
``summary_questions.csv`` and a table with one row per question: the model that learns every
question beside the model that learns that question alone, the fraction error and the accuracy on
confident galaxies as mean ± sd over the repeats, and their difference paired by repeat (the same
seed splits the data the same way), with its 95% interval.

A summary covers one launch: a second launch into the same ``hydra.sweep.dir`` (a grid run
again, a smaller one) gets new job directories (``<job number>_<launch time>``, see
``conf/hydra/default.yaml``) and a summary of its own jobs only, never the earlier launch's. A
sweeper that keeps its study in storage (the Optuna search, ``hydra.sweeper.storage``) continues
one search over several launches, and its summary covers the jobs of all of them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: The results each job contributes, under the names the run logged them (and metrics.json has).
RESULTS = ("val/acc_best", "test/acc", "test/ece", "test/ece_uncalibrated", "test/ece_floor",
           "val/acc_largest_drop")
#: A decision-tree job's results per question (``test/tree/<question>/<result>``).
QUESTION_RESULTS = ("mae", "acc_confident", "n_confident", "calibration_error")
#: The results summarised over the repeats of a configuration: all of them.
GROUPED = RESULTS
COLUMNS = ["job", "overrides", *RESULTS, "best_step", "params", "fit_minutes", "status", "run_dir",
           "all_overrides"]
#: What a repeat of one configuration varies: the seed, or the cross-validation fold.
REPEATS = ("seed=", "data.fold=")
STATS = ("mean", "std", "ci95_low", "ci95_high", "min", "max")
GROUP_COLUMNS = ["config", "runs", "repeats", "params", "fit_minutes",
                 *[f"{k}_{s}" for k in GROUPED for s in STATS]]
#: Student's t, 97.5th percentile, by degrees of freedom 1..30 (beyond: :func:`t975`).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """Student's t, 97.5th percentile: the table to 30 degrees of freedom, then
    ``1.96 + 2.46 / df`` (linear in 1/df from t(30) = 2.042 to the normal's 1.96; within 0.001 of
    the exact value: t(40) = 2.021, t(60) = 2.000, t(120) = 1.980), so no scipy is needed."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df} must be at least 1")
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.46 / df


def job_dirs(sweep_dir: str | Path) -> dict[Path, int]:
    """The job directories (those holding ``.hydra/config.yaml``) under ``sweep_dir``, with the
    time that file was written (ns): Hydra rewrites it whenever a job starts in the directory."""
    return {p.parent.parent: p.stat().st_mtime_ns for p in Path(sweep_dir).glob("*/.hydra/config.yaml")}


def _sweep_order(job: Path) -> tuple[int, int, str]:
    """Job number first (``10_...`` after ``9_...``), then the launch."""
    number = job.name.split("_", 1)[0]
    return (0, int(number), job.name) if number.isdigit() else (1, 0, job.name)


def summarize(sweep_dir: str | Path, jobs: Iterable[Path] | None = None) -> list[dict[str, Any]]:
    """Rows for the given job directories (default: every one under ``sweep_dir``).

    ``overrides`` lists what differs between the jobs (the swept values); ``all_overrides`` has
    every command-line override of the job.
    """
    rows = []
    for job in sorted(job_dirs(sweep_dir) if jobs is None else jobs, key=_sweep_order):
        hydra_dir = job / ".hydra"
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or [] \
            if (hydra_dir / "overrides.yaml").is_file() else []
        row: dict[str, Any] = {"job": job.name, "all_overrides": overrides, "run_dir": str(job)}
        metrics_file = job / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            seconds = metrics.get("fit_seconds")
            row.update({k: metrics.get(k) for k in RESULTS}, best_step=metrics.get("best_step"),
                       params=metrics.get("params"),
                       fit_minutes=seconds / 60 if seconds is not None else None, status="done",
                       **_tree_results(metrics, hydra_dir / "config.yaml"))
        else:
            row.update(dict.fromkeys(RESULTS), best_step=None, params=None, fit_minutes=None,
                       status="no metrics.json")
        rows.append(row)
    common = set.intersection(*(set(r["all_overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["all_overrides"] if o not in common)
        r["all_overrides"] = " ".join(r["all_overrides"])
    rows.sort(key=lambda r: -(r["val/acc_best"] if r["val/acc_best"] is not None else -1))
    return rows


def _tree_results(metrics: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """A decision-tree job's test metrics per question (``questions``: {question: {mae,
    acc_confident, n_confident, calibration_error}}, in the tree's order) and the questions it
    learned (``learned``: None for every question); nothing for other jobs."""
    per_question: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[:2] == ["test", "tree"] and parts[3] in QUESTION_RESULTS:
            per_question.setdefault(parts[2], {})[parts[3]] = value
    if not per_question:
        return {}
    from galaxy_lightning.decision_tree import TREES  # deferred: torch
    from galaxy_lightning.module import metric_slug

    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    learned = ((config or {}).get("task") or {}).get("questions")
    order = list(per_question)
    tree = ((config or {}).get("data") or {}).get("source", {}).get("tree")
    if isinstance(tree, str) and tree in TREES:
        order = [metric_slug(q.name) for q in TREES[tree].questions
                 if metric_slug(q.name) in per_question]
    return {"questions": {q: per_question[q] for q in order},
            "learned": None if learned is None else [metric_slug(str(q)) for q in learned]}


def question_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per question: the decision-tree configuration that learns every question against the one
    that learns only that question (``task.questions=[q]``), among configurations that differ in
    nothing else; fraction MAE and accuracy on confident galaxies over the repeats, and the
    difference (alone - every question) paired by repeat. Empty when the sweep has no such pair."""
    done = [r for r in rows if r["status"] == "done" and r.get("questions")]

    def base(r: dict[str, Any]) -> str:
        return " ".join(o for o in config_of(r["all_overrides"]).split()
                        if not o.startswith("task.questions="))

    out = []
    for b in dict.fromkeys(base(r) for r in done):
        members = [r for r in done if base(r) == b]
        joint = [r for r in members if r["learned"] is None]
        if not joint:
            continue
        for q in joint[0]["questions"]:
            alone = [r for r in members if r["learned"] == [q]]
            if not alone:
                continue
            row: dict[str, Any] = {"config": b, "question": q}
            for key in QUESTION_RESULTS:
                for name, runs in (("every", joint), ("alone", alone)):
                    stats = summary_statistics(_finite([r["questions"][q].get(key) for r in runs]))
                    row.update({f"{name}_{key}_{s}": v for s, v in stats.items()})
                paired = {_repeat_of(r["all_overrides"]): r["questions"][q].get(key) for r in joint}
                diffs = _finite([r["questions"][q].get(key) - paired[rep]
                                 for r in alone if (rep := _repeat_of(r["all_overrides"])) in paired
                                 and paired[rep] is not None and r["questions"][q].get(key)
                                 is not None])
                row.update({f"difference_{key}_{s}": v
                            for s, v in summary_statistics(diffs).items()})
                row[f"difference_{key}_pairs"] = len(diffs)
            out.append(row)
    return out


def _finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers (a question with no confident galaxy in a test split has NaN)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def question_table(comparison: list[dict[str, Any]]) -> str:
    """:func:`question_comparison` as Markdown: mean ± sd over the repeats; the paired
    difference with its 95% interval (an interval that excludes 0 is a difference the repeats
    resolve)."""
    lines = ["| question | fraction MAE: every question | alone | alone - every [95% CI] | "
             "accuracy, confident: every question | alone | alone - every [95% CI] | "
             "confident test galaxies |", "|---|---|---|---|---|---|---|---:|"]

    def ms(row: dict[str, Any], key: str, scale: float, digits: int) -> str:
        if row[f"{key}_mean"] is None:
            return "-"
        sd = row[f"{key}_std"]
        return f"{scale * row[f'{key}_mean']:.{digits}f}" + \
            (f" ± {scale * sd:.{digits}f}" if sd is not None else "")

    def diff(row: dict[str, Any], key: str, scale: float, digits: int) -> str:
        mean, lo, hi = (row[f"difference_{key}_{s}"] for s in ("mean", "ci95_low", "ci95_high"))
        if mean is None:
            return "-"
        text = f"{scale * mean:+.{digits}f}"
        return text + (f" [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]" if lo is not None
                       else "")

    for r in comparison:
        n = r["every_n_confident_mean"]
        lines.append(f"| {r['question']} | {ms(r, 'every_mae', 1, 3)} | {ms(r, 'alone_mae', 1, 3)} | "
                     f"{diff(r, 'mae', 1, 3)} | {ms(r, 'every_acc_confident', 100, 1)} | "
                     f"{ms(r, 'alone_acc_confident', 100, 1)} | {diff(r, 'acc_confident', 100, 1)} | "
                     f"{'-' if n is None else f'{n:.0f}'} |")
    return "\n".join(lines)


def _repeat_of(overrides: str) -> str:
    """What distinguishes a repeat: 'seed=1', 'data.fold=2', or both."""
    return " ".join(o for o in overrides.split() if o.startswith(REPEATS)) or "-"


def summary_statistics(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation, 95% confidence interval of the mean, min and max."""
    if not values:
        return dict.fromkeys(STATS)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    half = t975(len(values) - 1) * std / len(values) ** 0.5 if std is not None else None
    return {"mean": mean, "std": std, "ci95_low": mean - half if half is not None else None,
            "ci95_high": mean + half if half is not None else None,
            "min": min(values), "max": max(values)}


def config_of(overrides: str) -> str:
    """A job's configuration: its overrides without ``seed=`` and ``data.fold=`` (what repeats
    vary) and without ``paths.*`` and ``hydra.*`` (which say where, not what)."""
    return " ".join(o for o in overrides.split()
                    if not o.startswith((*REPEATS, "paths.", "hydra."))) or "(defaults)"


def group_by_config(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished jobs grouped by their overrides without ``seed=`` and ``data.fold=`` (and
    without ``paths.*`` and ``hydra.*``, which say where, not what): :func:`summary_statistics`
    of test accuracy and ECE over the repeats, and the mean training minutes, in sweep order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: _sweep_order(Path(r["job"]))):
        if r["status"] != "done" or r["test/acc"] is None:
            continue
        groups.setdefault(config_of(r["all_overrides"]), []).append(r)
    out = []
    for config, members in groups.items():
        minutes = [m["fit_minutes"] for m in members if m["fit_minutes"] is not None]
        row: dict[str, Any] = {
            "config": config, "runs": len(members), "params": members[0]["params"],
            "repeats": ", ".join(_repeat_of(m["all_overrides"]) for m in members),
            "fit_minutes": statistics.fmean(minutes) if minutes else None}
        for key in GROUPED:
            stats = summary_statistics([m[key] for m in members if m.get(key) is not None])
            row.update({f"{key}_{name}": value for name, value in stats.items()})
        out.append(row)
    return out


def markdown_table(groups: list[dict[str, Any]]) -> str:
    """The per-configuration table as Markdown (what the README's comparison tables are):
    mean ± standard deviation [95% confidence interval of the mean] over the repeats; the ECE
    with its floor (what a perfectly calibrated model would show on as many test images) and
    before temperature scaling; the largest fall of validation accuracy between two checks
    after warm-up, mean (worst)."""
    lines = ["| config | params | minutes | test accuracy: mean ± sd [95% CI] | "
             "ECE: mean ± sd [95% CI] | ECE floor | ECE before calibration | "
             "largest val drop: mean (max) | runs |", "|---|---:|---:|---|---|---|---|---|---|"]

    def fmt(g: dict[str, Any], key: str, scale: float, digits: int, unit: str) -> str:
        if g.get(f"{key}_mean") is None:
            return "-"
        text = f"{scale * g[f'{key}_mean']:.{digits}f}{unit}"
        if g[f"{key}_std"] is not None:
            text += (f" ± {scale * g[f'{key}_std']:.{digits}f} [{scale * g[f'{key}_ci95_low']:.{digits}f}"
                     f"-{scale * g[f'{key}_ci95_high']:.{digits}f}]")
        return text

    def mean_max(g: dict[str, Any], key: str, scale: float, digits: int, unit: str) -> str:
        if g.get(f"{key}_mean") is None:
            return "-"
        return (f"{scale * g[f'{key}_mean']:.{digits}f}{unit} "
                f"({scale * g[f'{key}_max']:.{digits}f}{unit})")

    def mean(g: dict[str, Any], key: str) -> str:
        return "-" if g.get(f"{key}_mean") is None else f"{g[f'{key}_mean']:.3f}"

    for g in groups:
        params = f"{g['params']:,}" if g["params"] is not None else "-"
        minutes = f"{g['fit_minutes']:.1f}" if g["fit_minutes"] is not None else "-"
        lines.append(f"| {g['config']} | {params} | {minutes} | {fmt(g, 'test/acc', 100, 1, '%')} | "
                     f"{fmt(g, 'test/ece', 1, 3, '')} | {mean(g, 'test/ece_floor')} | "
                     f"{mean_max(g, 'test/ece_uncalibrated', 1, 3, '')} | "
                     f"{mean_max(g, 'val/acc_largest_drop', 100, 1, ' pts')} | "
                     f"{g['runs']} ({g['repeats']}) |")
    return "\n".join(lines)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_summary(sweep_dir: str | Path, jobs: Iterable[Path] | None = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write ``summary.csv`` of ``jobs`` (default: all) and, when configurations repeat over
    seeds, ``summary_by_config.csv`` into the sweep directory (an earlier launch's
    ``summary_by_config.csv`` is removed when this one has no repeats, so the two files always
    describe the same jobs); return the job rows and the groups."""
    rows = summarize(sweep_dir, jobs)
    groups = group_by_config(rows)
    _write_csv(Path(sweep_dir) / "summary.csv", COLUMNS, rows)
    comparison = question_comparison(rows)
    questions_file = Path(sweep_dir) / "summary_questions.csv"
    if comparison:
        _write_csv(questions_file, list(comparison[0]), comparison)
    else:
        questions_file.unlink(missing_ok=True)
    by_config = Path(sweep_dir) / "summary_by_config.csv"
    if any(g["runs"] > 1 for g in groups):
        _write_csv(by_config, GROUP_COLUMNS, groups)
    else:
        by_config.unlink(missing_ok=True)
    return rows, groups


def format_table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    cols = ["job", *RESULTS, "best_step", "overrides"]
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: summary.csv and a printed table at the end of every multirun, of the jobs
    this launch ran (all launches' jobs for a search whose study is stored, see the module).

    ``launch`` (``${now:%H-%M-%S_%f}`` in ``conf/hydra/default.yaml``) names the launch. Hydra
    builds its callbacks in the launching process before any job, and copies that process's
    resolver cache into every job's config, so resolving the time here makes the same
    ``${now:%H-%M-%S_%f}`` in ``hydra.sweep.subdir`` one value for all the jobs of a launch (also
    on joblib workers, and for a SLURM job that is requeued) rather than each job's start time.
    """

    def __init__(self, launch: str | None = None) -> None:
        self.launch = launch
        self._before: dict[Path, int] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # what was there before: the jobs of this launch are those it adds or rewrites
        self._before = job_dirs(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs: list[Path] | None = None  # all of them
        scope = "every launch of the stored study"
        if config.hydra.sweeper.get("storage") is None:
            before = self._before or {}
            jobs = [job for job, written in job_dirs(sweep_dir).items() if before.get(job) != written]
            scope = f"launch {self.launch}" if self.launch else "this launch"
        rows, groups = write_summary(sweep_dir, jobs)
        print(f"\nsweep summary, {scope}, {len(rows)} jobs ({sweep_dir / 'summary.csv'}):\n"
              f"{format_table(rows)}", flush=True)
        if any(g["runs"] > 1 for g in groups):
            print(f"\nover repeats ({sweep_dir / 'summary_by_config.csv'}):\n"
                  f"{markdown_table(groups)}", flush=True)
        if comparison := question_comparison(rows):
            print(f"\nevery question at once against each question alone "
                  f"({sweep_dir / 'summary_questions.csv'}):\n{question_table(comparison)}",
                  flush=True)
        from galaxy_lightning.report import write_report  # deferred: jinja2

        try:  # the jobs wrote their own reports; this one links them
            print(f"report: {write_report(sweep_dir, jobs=False)}", flush=True)
        except Exception as err:  # noqa: BLE001 (the report is optional; the sweep is done)
            log.warning("could not write the sweep's report.html (%s); run galaxy-report %s",
                        err, sweep_dir)
