"""galaxy-report: one self-contained HTML page per run, and per sweep, to open anywhere or send.

A run's results are a folder of PNGs, a metrics.json and checkpoints; a supervisor or a
collaborator wants one file that opens in any browser, on a laptop or a phone, without a server
and without the network. :func:`write_report` renders ``report.html`` from what a run directory
holds (every figure inline as a data URI, the per-class scores, the binomial interval on the
accuracy, the mistakes linked to the sky), or, for a sweep or fold directory, a sortable table of
its jobs linking to each job's own report. Runs write theirs at the end (``train.py``), sweeps at
the end of the multirun; ``galaxy-report DIR`` (re)writes them for folders of any version, showing
what the files there allow::

    galaxy-report logs/quickstart/runs/2026-12-04_10-00-00_000000
    galaxy-report logs/train/multiruns/2026-12-04_10-00-00_000000   # the sweep and every job
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from galaxy_lightning.errors import DataError, cli_boundary
from galaxy_lightning.files import write_atomic

REPORT = "report.html"
#: The public sky viewer of the DESI Legacy Imaging Surveys (the images of GZ DECaLS), centred on
#: an object; the zoom shows about a 2-arcminute field.
LEGACY_VIEWER = "https://www.legacysurvey.org/viewer?ra={ra:.6f}&dec={dec:.6f}&layer=ls-dr10&zoom=16"
#: The figures a run writes, by the report's name for them.
FIGURES = {"confusion": "confusion_matrix.png", "reliability": "reliability_diagram.png",
           "examples": "examples.png", "mistakes": "mistakes.png",
           "accuracy_curve": "accuracy_curve.png", "tree_questions": "tree_questions.png"}


def _version() -> str:
    try:
        return version("galaxy_lightning")
    except PackageNotFoundError:  # a source tree that was not installed
        return "(not installed)"


def pct(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def accuracy_interval(correct: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of ``correct`` out of ``total`` (astropy):
    a test set of a few hundred images leaves the accuracy uncertain by several points."""
    from astropy.stats import binom_conf_interval  # deferred: astropy is slow to import

    low, high = binom_conf_interval(correct, total, confidence_level=0.95, interval="wilson")
    return float(low), float(high)


def per_class_scores(confusion: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall and F1 of every class from a confusion matrix (rows: true class)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    out = []
    for i, name in enumerate(names):
        precision = hits[i] / predicted[i] if predicted[i] else float("nan")
        recall = hits[i] / actual[i] if actual[i] else float("nan")
        f1 = (2 * precision * recall / (precision + recall)
              if np.isfinite(precision) and np.isfinite(recall) and precision + recall else
              float("nan"))
        out.append({"name": name, "precision": precision, "recall": recall, "f1": f1,
                    "support": int(actual[i])})
    return out


def _data_uri(path: Path) -> str | None:
    import base64

    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _curves(history: dict[str, list[Any]]) -> str | None:
    """Accuracy and (where recorded) loss of training and validation, as one inline PNG."""
    from galaxy_lightning.plots import figure_to_array, png_data_uri, plt

    if not history.get("val_step"):
        return None
    losses = any(v is not None for v in history.get("val_loss", []) + history.get("train_loss", []))
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(10 if losses else 5.5, 3.4),
                             squeeze=False)
    panels = [("accuracy", "acc")] + ([("loss", "loss")] if losses else [])
    for ax, (title, key) in zip(axes[0], panels):
        for stage, style in (("train", "-"), ("val", "-o")):
            steps, values = history.get(f"{stage}_step", []), history.get(f"{stage}_{key}", [])
            pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
            if pairs:
                ax.plot(*zip(*pairs), style, markersize=3,
                        label="training" if stage == "train" else "validation")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.set_dpi(100)
    return png_data_uri(figure_to_array(fig))


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def run_context(run_dir: Path) -> dict[str, Any]:
    """Everything the run page shows, from the files of ``run_dir`` (any version's)."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise DataError(f"{run_dir}: no metrics.json; give a run directory of galaxy-train or "
                        "galaxy-evaluate (or a sweep directory)")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{metrics_file}: not readable JSON ({err.msg}, line {err.lineno}); "
                        "rerun galaxy-evaluate on the checkpoint to write it again") from None
    config = _read_yaml(run_dir / "config.yaml") or {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    names = list(metrics.get("class_names") or [])
    test = None
    confusion = np.asarray(metrics.get("test/confusion_matrix") or [[0]])
    total, correct = int(confusion.sum()), int(np.trace(confusion))
    if metrics.get("test/acc") is not None and total > 0:
        low, high = accuracy_interval(correct, total)
        test = {"acc": metrics["test/acc"], "acc_low": low, "acc_high": high, "n": total,
                "ece": metrics.get("test/ece"), "ece_floor": metrics.get("test/ece_floor"),
                "ece_uncalibrated": metrics.get("test/ece_uncalibrated"),
                "loss": metrics.get("test/loss"), "temperature": metrics.get("test/temperature"),
                "classes": per_class_scores(confusion, names or [str(i) for i in range(len(confusion))])}
    mistakes = _read_mistakes(run_dir / "mistakes.json")
    figures = {key: _data_uri(run_dir / name) for key, name in FIGURES.items()}
    figures["curves"] = _curves(metrics.get("history") or {}) or figures["accuracy_curve"]
    seconds = metrics.get("fit_seconds")
    task = config.get("task_name") or run_dir.parent.parent.name
    spec = metrics.get("input_spec")
    data = config.get("data")
    return {
        "kind": "run", "title": f"{task}: {pct(metrics.get('test/acc'))} test accuracy"
        if test else f"{task}: run report",
        "run_dir": str(run_dir), "finished": metrics.get("finished"), "test": test,
        "calibrated": metrics.get("calibrated"), "tta": metrics.get("tta"),
        "val_best": metrics.get("val/acc_best"), "best_step": metrics.get("best_step"),
        "largest_drop": metrics.get("val/acc_largest_drop"), "figures": figures,
        "mistakes": mistakes, "any_sky": any(m.get("viewer") for m in mistakes),
        "command": " ".join(["galaxy-train", *overrides]) if overrides is not None
        else "(not recorded: started outside Hydra)",
        "seed": config.get("seed", "-"), "model": (config.get("model") or {}).get("_target_"),
        "params": metrics.get("params"), "steps": metrics.get("global_step"),
        "fit_minutes": seconds / 60 if seconds is not None else None,
        "checkpoint": metrics.get("checkpoint"), "tags": metrics.get("tags") or [],
        "data": yaml.safe_dump(data, sort_keys=False) if data else None,
        "spec": yaml.safe_dump(spec, sort_keys=False) if spec else None,
        "environment": metrics.get("environment"),
        "config": yaml.safe_dump(config, sort_keys=False) if config else "(no config.yaml)",
    }


def _read_mistakes(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    for m in records:
        m.setdefault("id", None)
        m.setdefault("ra", None)
        m.setdefault("dec", None)
        m["viewer"] = (LEGACY_VIEWER.format(ra=m["ra"], dec=m["dec"])
                       if m["ra"] is not None and m["dec"] is not None else None)
    return records


def sweep_context(sweep_dir: Path) -> dict[str, Any]:
    """The sweep page: its jobs (each linking to its report) and, over repeats, its configurations."""
    from galaxy_lightning.sweep import REPEATS, config_of, group_by_config, summarize

    rows = summarize(sweep_dir)
    if not rows:
        raise DataError(f"{sweep_dir}: no job directories (with .hydra/config.yaml); give a "
                        "sweep directory (logs/<task>/multiruns/<time>) or a run directory")
    shown = []
    for r in rows:
        report = Path(r["run_dir"]) / REPORT
        shown.append({"job": r["job"], "overrides": r["overrides"], "val": r["val/acc_best"],
                      "acc": r["test/acc"], "ece": r["test/ece"], "drop": r["val/acc_largest_drop"],
                      "best_step": r["best_step"], "minutes": r["fit_minutes"], "status": r["status"],
                      "report": f"{r['job']}/{REPORT}" if report.is_file() else None})
    groups = group_by_config(rows)
    members: dict[str, list[dict[str, str]]] = {}
    for r, row in zip(rows, shown):  # each configuration's repeats, linked to their reports
        if row["report"]:
            members.setdefault(config_of(r["all_overrides"]), []).append(
                {"label": " ".join(o for o in r["all_overrides"].split() if o.startswith(REPEATS))
                 or r["job"], "report": row["report"]})
    common = set.intersection(*(set(g["config"].split()) for g in groups)) if groups else set()
    every = set.intersection(*(set(r["all_overrides"].split()) for r in rows))
    return {
        "kind": "sweep", "title": f"{sweep_dir.parent.parent.name}: sweep of {len(rows)} jobs",
        "run_dir": str(sweep_dir), "rows": shown, "common": " ".join(sorted(every)),
        "groups": [{"label": " ".join(o for o in g["config"].split() if o not in common)
                    or "(as every job)", "runs": g["runs"],
                    "acc_mean": g["test/acc_mean"], "acc_std": g["test/acc_std"],
                    "acc_low": g["test/acc_ci95_low"], "acc_high": g["test/acc_ci95_high"],
                    "ece_mean": g["test/ece_mean"], "drop_max": g["val/acc_largest_drop_max"],
                    "minutes": g["fit_minutes"], "jobs": members.get(g["config"], [])}
                   for g in groups if any(x["runs"] > 1 for x in groups)],
    }


def render(context: dict[str, Any]) -> str:
    """The page for a run or sweep context (Jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("galaxy_lightning", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=False, lstrip_blocks=False)
    template = env.get_template(REPORT)
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return template.render(**context, pct=pct, fmt=fmt, version=_version(), written=written)


def is_sweep(directory: Path) -> bool:
    from galaxy_lightning.sweep import job_dirs

    return not (directory / "metrics.json").is_file() and bool(job_dirs(directory))


def write_report(directory: str | Path, jobs: bool = True) -> Path:
    """Write ``report.html`` into a run or sweep directory (for a sweep, first every job's own
    report when ``jobs``, so the table links to them); return its path."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; give a run or sweep directory")
    if is_sweep(directory):
        if jobs:
            from galaxy_lightning.sweep import job_dirs

            for job in sorted(job_dirs(directory)):
                if (job / "metrics.json").is_file():
                    write_report(job)
        context = sweep_context(directory)
    else:
        context = run_context(directory)
    out = directory / REPORT
    write_atomic(out, render(context))
    return out


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-report", description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="a run directory (with metrics.json) or a sweep/fold directory")
    args = parser.parse_args(argv)
    for directory in args.directories:
        print(f"wrote {write_report(directory)}")


if __name__ == "__main__":
    main()
