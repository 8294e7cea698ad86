"""The summary of a Hydra multirun: one row per job with its overrides and results.

Hydra calls :class:`SweepSummary` when a sweep ends (``conf/hydra/default.yaml`` registers it).
It reads every job's ``.hydra/overrides.yaml`` and ``metrics.json`` and writes
``summary.csv`` into the sweep directory, sorted by best validation accuracy, and prints it.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = ["job", "overrides", "val_acc_best", "test_acc", "best_step", "status", "run_dir",
           "all_overrides"]


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
            row.update(val_acc_best=metrics.get("val_acc_best"), test_acc=metrics.get("test_acc"),
                       best_step=metrics.get("best_step"), status="done")
        else:
            row.update(val_acc_best=None, test_acc=None, best_step=None, status="no metrics.json")
        rows.append(row)
    common = set.intersection(*(set(r["all_overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["all_overrides"] if o not in common)
        r["all_overrides"] = " ".join(r["all_overrides"])
    rows.sort(key=lambda r: -(r["val_acc_best"] if r["val_acc_best"] is not None else -1))
    return rows


def write_summary(sweep_dir: str | Path) -> Path:
    """Write ``summary.csv`` into the sweep directory and return its path."""
    rows = summarize(sweep_dir)
    path = Path(sweep_dir) / "summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    cols = ["job", "val_acc_best", "test_acc", "best_step", "overrides"]
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
        path = write_summary(sweep_dir)
        table = format_table(summarize(sweep_dir))
        print(f"\nsweep summary ({path}):\n{table}", flush=True)
