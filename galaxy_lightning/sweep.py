"""The summary of a Hydra multirun: one row per job with its overrides and results.

Hydra calls :class:`SweepSummary` when a sweep ends (``conf/hydra/default.yaml`` registers it).
It reads every job's ``.hydra/overrides.yaml`` and ``metrics.json`` and writes
``summary.csv`` into the sweep directory, sorted by best validation accuracy, and prints it.
When the sweep repeats configurations over seeds (``seed=0,1,2``), it also writes
``summary_by_config.csv`` and prints a Markdown table with one row per configuration: the
model's parameters, training minutes, and test accuracy and ECE as mean, min and max over seeds.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: The results each job contributes, under the names the run logged them (and metrics.json has).
RESULTS = ("val/acc_best", "test/acc", "test/ece")
COLUMNS = ["job", "overrides", *RESULTS, "best_step", "params", "fit_minutes", "status", "run_dir",
           "all_overrides"]
GROUP_COLUMNS = ["config", "runs", "seeds", "params", "fit_minutes", "test/acc_mean",
                 "test/acc_min", "test/acc_max", "test/ece_mean", "test/ece_min", "test/ece_max"]


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Rows for every job directory (one holding ``.hydra/``) under ``sweep_dir``.

    ``overrides`` lists what differs between the jobs (the swept values); ``all_overrides`` has
    every command-line override of the job.
    """
    rows = []
    for hydra_dir in sorted(Path(sweep_dir).glob("*/.hydra"), key=lambda p: (len(p.parent.name), p.parent.name)):
        job = hydra_dir.parent
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or [] \
            if (hydra_dir / "overrides.yaml").is_file() else []
        row: dict[str, Any] = {"job": job.name, "all_overrides": overrides, "run_dir": str(job)}
        metrics_file = job / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            seconds = metrics.get("fit_seconds")
            row.update({k: metrics.get(k) for k in RESULTS}, best_step=metrics.get("best_step"),
                       params=metrics.get("params"),
                       fit_minutes=seconds / 60 if seconds is not None else None, status="done")
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


def _seed_of(overrides: str) -> str | None:
    match = re.search(r"(?:^| )seed=(\S+)", overrides)
    return match.group(1) if match else None


def group_by_config(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished jobs grouped by their overrides without ``seed=`` (and without ``paths.*`` and
    ``hydra.*``, which say where, not what): the mean, min and max over seeds of test accuracy
    and ECE, and the mean training minutes, in sweep order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (len(r["job"]), r["job"])):
        if r["status"] != "done" or r["test/acc"] is None:
            continue
        config = " ".join(o for o in r["all_overrides"].split()
                          if not o.startswith(("seed=", "paths.", "hydra."))) or "(defaults)"
        groups.setdefault(config, []).append(r)
    out = []
    for config, members in groups.items():
        minutes = [m["fit_minutes"] for m in members if m["fit_minutes"] is not None]
        row: dict[str, Any] = {
            "config": config, "runs": len(members), "params": members[0]["params"],
            "seeds": " ".join(str(_seed_of(m["all_overrides"])) for m in members),
            "fit_minutes": statistics.fmean(minutes) if minutes else None}
        for key in ("test/acc", "test/ece"):
            values = [m[key] for m in members if m[key] is not None]
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_min"] = min(values) if values else None
            row[f"{key}_max"] = max(values) if values else None
        out.append(row)
    return out


def markdown_table(groups: list[dict[str, Any]]) -> str:
    """The per-configuration table as Markdown (what the README's comparison table is)."""
    lines = ["| config | params | minutes | test accuracy: mean (min-max) | ECE: mean (min-max) | seeds |",
             "|---|---:|---:|---|---|---|"]
    for g in groups:
        acc = "-" if g["test/acc_mean"] is None else (
            f"{100 * g['test/acc_mean']:.1f}% ({100 * g['test/acc_min']:.1f}-{100 * g['test/acc_max']:.1f})")
        ece = "-" if g["test/ece_mean"] is None else (
            f"{g['test/ece_mean']:.3f} ({g['test/ece_min']:.3f}-{g['test/ece_max']:.3f})")
        params = f"{g['params']:,}" if g["params"] is not None else "-"
        minutes = f"{g['fit_minutes']:.1f}" if g["fit_minutes"] is not None else "-"
        lines.append(f"| {g['config']} | {params} | {minutes} | {acc} | {ece} | {g['seeds']} |")
    return "\n".join(lines)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_summary(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write ``summary.csv`` (and, when configurations repeat over seeds,
    ``summary_by_config.csv``) into the sweep directory; return the job rows and the groups."""
    rows = summarize(sweep_dir)
    groups = group_by_config(rows)
    _write_csv(Path(sweep_dir) / "summary.csv", COLUMNS, rows)
    if any(g["runs"] > 1 for g in groups):
        _write_csv(Path(sweep_dir) / "summary_by_config.csv", GROUP_COLUMNS, groups)
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
    """Hydra callback: summary.csv and a printed table at the end of every multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows, groups = write_summary(sweep_dir)
        print(f"\nsweep summary ({sweep_dir / 'summary.csv'}):\n{format_table(rows)}", flush=True)
        if any(g["runs"] > 1 for g in groups):
            print(f"\nover seeds ({sweep_dir / 'summary_by_config.csv'}):\n"
                  f"{markdown_table(groups)}", flush=True)
