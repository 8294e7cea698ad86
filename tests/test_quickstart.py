"""The README's quickstart, run exactly as a newcomer would (slow: it simulates 12,600 galaxies)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_trains_well_above_chance_and_writes_every_output(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=quickstart",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 400
    assert metrics["test_acc"] > 0.45  # chance is 1/7
    assert sum(map(sum, metrics["confusion_matrix"])) == 1000
    for name in ("accuracy_curve.png", "confusion_matrix.png", "examples.png", "config.yaml",
                 "quickstart.log", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
