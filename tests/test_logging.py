"""Every dashboard shows everything: TensorBoard (served and queried over HTTP), MLflow, W&B and
CSV, read back through their own clients; tags; the config tree; progress in a log file."""

from __future__ import annotations

import csv
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from galaxy_lightning.train import main, train

from .cli import in_process
from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
#: Small data without TINY's trainer settings, which would override a preset's.
SMALL = ["data=synthetic", "data.source.n_per_class=60", "data.source.image_size=32",
         "data.splits=[280,70,70]", "data.batch_size=40", "data.eval_batch_size=70",
         "trainer.enable_model_summary=false", "callbacks.progress_bar.every_n_steps=1000"]


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One tiny run logged by TensorBoard, CSV, MLflow and W&B (offline), with tags."""
    from hydra.core.global_hydra import GlobalHydra

    from .conftest import compose_run

    base = tmp_path_factory.mktemp("many")
    cfg = compose_run([*TINY, "logger=many", "tags=[baseline,dr5]", "callbacks.run_artifacts.figures=true"], base / "logs" / "run",
                      base / "data")
    train(cfg)
    GlobalHydra.instance().clear()
    return base / "logs" / "run", base / "logs", json.loads((base / "logs" / "run" / "metrics.json").read_text())


def test_mlflow_store_holds_metrics_params_tags_and_figures(many: tuple) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, logs, metrics = many
    client = MlflowClient(f"sqlite:///{logs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run.data.metrics["val/acc_best"] == pytest.approx(metrics["val/acc_best"])
    assert run.data.params["model/_target_"] == "galaxy_lightning.models.TutorialCNN"
    assert run.data.tags["baseline"] == "true" and run.data.tags["tags"] == "baseline, dr5"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "metrics.json" in artifacts
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures/test/confusion_matrix")]
    assert figures and figures[0].endswith(".png")


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (LevelDB log blocks of W&B's own protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL or FIRST
            pending = chunk
        else:  # MIDDLE or LAST
            pending += chunk
        if kind in (1, 4) and pending:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_metrics_tags_and_figures(many: tuple) -> None:
    run_dir, _, metrics = many
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = _wandb_records(next(offline.glob("run-*.wandb")))
    history = {item.key or "/".join(item.nested_key): item.value_json
               for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert float(history["test/acc"]) == pytest.approx(metrics["test/acc"])
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert list(run.tags) == ["baseline", "dr5"]
    images = list((offline / "files" / "media" / "images").rglob("*.png"))
    assert any("confusion_matrix" in p.name for p in images)
    assert (offline / "files" / "metrics.json").is_file()


def test_csv_log_holds_the_metrics(many: tuple) -> None:
    run_dir, _, metrics = many
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    tests = [float(r["test/acc"]) for r in rows if r.get("test/acc")]
    assert tests and tests[-1] == pytest.approx(metrics["test/acc"])
    assert metrics["tags"] == ["baseline", "dr5"]
    assert "baseline" in (run_dir / "csv" / "hparams.yaml").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_scalars_images_and_the_custom_layout(many: tuple) -> None:
    run_dir, _, metrics = many
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data/plugin"

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"{base}/{path}", timeout=5) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scalars = get("scalars/tags")
                if scalars:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not start"
            time.sleep(0.5)
        tags = {tag for run in scalars.values() for tag in run}
        assert {"train/loss", "train/acc", "val/acc", "test/acc", "train/lr"} <= tags
        (run,) = [name for name, run_tags in scalars.items() if "test/acc" in run_tags]
        quote = urllib.parse.quote
        series = get(f"scalars/scalars?run={quote(run)}&tag={quote('test/acc')}")
        assert series[-1][2] == pytest.approx(metrics["test/acc"])  # (wall time, step, value)
        images = {tag for run in get("images/tags").values() for tag in run}
        assert {"test/confusion_matrix", "curves/accuracy", "data/examples"} <= images
        served = get(f"images/images?run={quote(run)}&tag={quote('test/confusion_matrix')}")
        assert served and served[-1]["query"] and served[-1]["step"] >= 0  # the image is there
        layout = get("custom_scalars/layout")
        charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
        assert charts["accuracy: training and validation"] == ["^train/acc$", "^val/acc$"]
        assert charts["loss: training and validation"] == ["^train/loss$", "^val/loss$"]
        # the chart draws exactly the two series, not val/acc_best or the per-class accuracies
        drawn = get(f"custom_scalars/scalars?run={quote(run)}&tag={quote('^val/acc$')}")
        assert list(drawn["tag_to_events"]) == ["val/acc"]
        hparams = urllib.request.urlopen(urllib.request.Request(
            f"{base}/hparams/experiment", data=json.dumps({"experimentName": ""}).encode(),
            headers={"Content-Type": "application/json"}), timeout=5).read()
        assert b"val/acc_best" in hparams and b"model/_target_" in hparams
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_redirected_run_prints_lines_not_bar_fragments_and_the_config_tree(tmp_path: Path) -> None:
    # in this process, its output redirected as a file would be (not a terminal)
    result = in_process(main, *TINY, "logger=none", "callbacks.progress_bar.every_n_steps=5",
                        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "\r" not in out + result.stderr  # no live bar written into a file
    steps = [line for line in out.splitlines() if line.startswith("[train] step ")]
    assert [s.split()[2] for s in steps] == ["5/20", "10/20", "15/20", "20/20"]
    assert "val/acc" in next(line for line in out.splitlines() if line.startswith("[validation]"))
    tree = "_target_: galaxy_lightning.models.TutorialCNN"
    assert tree in out and out.index(tree) < out.index("[train] step")  # the config tree, first
    quiet = in_process(main, *TINY, "logger=none", "print_config=false",
                       f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run2'}",
                       cwd=tmp_path)
    assert quiet.returncode == 0 and tree not in quiet.stdout and "\r" not in quiet.stdout
    # a refused value: its one line, without the page of config tree above it
    refused = in_process(main, *TINY, "logger=none", "data.in_memory=maybe",
                         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run3'}",
                         cwd=tmp_path)
    assert refused.returncode != 0 and tree not in refused.stdout
    assert "data.in_memory='maybe' must be true, false or auto" in refused.stderr
    assert "Traceback" not in refused.stderr
    figures = in_process(main, *TINY, "logger=none", "callbacks.run_artifacts.figures=maybe",
                         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run4'}",
                         cwd=tmp_path)
    assert figures.returncode != 0 and "Traceback" not in figures.stderr
    assert "callbacks.run_artifacts: figures='maybe' must be true or false" in figures.stderr


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_to_zero(make_cfg: Callable[..., DictConfig]) -> None:
    """As a user types it: the default model (the tutorial CNN) memorises its one batch."""
    cfg = make_cfg("debug=overfit", *SMALL, "logger=none", tiny=False)
    assert cfg.model._target_.endswith("TutorialCNN") and cfg.data.overfit_batches == 1
    metrics = train(cfg)
    assert metrics["train/loss"] < 0.1


@pytest.mark.parametrize("preset, steps", [pytest.param("default", 7, marks=pytest.mark.slow),
                                           ("fdr", 1),
                                           pytest.param("limit", 9, marks=pytest.mark.slow)])
def test_debug_presets_run_as_template_users_expect(preset: str, steps: int,
                                                    make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(f"debug={preset}", *SMALL, "logger=none", tiny=False)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.detect_anomaly is True
    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    out = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert out["global_step"] == steps  # one epoch of 7 batches; one batch; 3 epochs of 3
