"""Evaluation, prediction and export of a trained checkpoint; augmentation; DDP on 2 CPU processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from galaxy_lightning.data.augment import dihedral, random_dihedral
from galaxy_lightning.data.datamodule import to_model_input
from galaxy_lightning.data.prepared import read_prepared, write_prepared
from galaxy_lightning.errors import GalaxyError
from galaxy_lightning.evaluate import evaluate, evaluation_datamodule, load_checkpoint
from galaxy_lightning.evaluate import main as evaluate_main
from galaxy_lightning.export import example_input, export, exportable
from galaxy_lightning.predict import predict, preprocess
from galaxy_lightning.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A run of the tiny config: (best checkpoint, metrics.json, data dir)."""
    from hydra.core.global_hydra import GlobalHydra

    from .conftest import TINY, compose_run

    base = tmp_path_factory.mktemp("trained")
    cfg = compose_run(TINY, base / "run", base / "data")
    train(cfg)
    GlobalHydra.instance().clear()
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    return Path(metrics["checkpoint"]), metrics, base / "data"


def test_evaluation_reproduces_the_test_accuracy_exactly(trained: tuple, tmp_path: Path) -> None:
    ckpt, metrics, _ = trained
    results = evaluate(ckpt, tmp_path / "eval")
    assert results["test/acc"] == metrics["test_acc"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["confusion_matrix"] == metrics["confusion_matrix"]
    assert written["test_acc_per_class"] == metrics["test_acc_per_class"]
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    assert list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluation_with_test_time_augmentation(trained: tuple, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    ckpt, metrics, _ = trained
    evaluate_main([str(ckpt), "--tta", "--out", str(tmp_path / "eval")])
    assert "ECE" in capsys.readouterr().out
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["tta"] is True and metrics["tta"] is False
    assert (tmp_path / "eval" / "reliability_diagram.png").is_file()
    module = load_checkpoint(ckpt)
    test = evaluation_datamodule(module).split("test")
    with torch.no_grad():
        log_probs = module.log_probs(to_model_input(test.images, module.hparams.scale), tta=True)
    assert written["test_acc"] == pytest.approx((log_probs.argmax(1) == test.labels).float().mean().item())
    assert written["test_loss"] == pytest.approx(F.nll_loss(log_probs, test.labels).item(), rel=1e-5)


def test_evaluation_of_another_prepared_file_and_bad_checkpoints(trained: tuple, tmp_path: Path) -> None:
    ckpt, _, data_dir = trained
    source = read_prepared(next(data_dir.glob("synthetic_*.h5")))
    other = write_prepared(tmp_path / "other.h5", source.images[:50], source.labels[:50],
                           source.info.class_names, {"source": "test"})
    results = evaluate(ckpt, tmp_path / "eval", prepared=str(other))
    cm = np.array(json.loads((tmp_path / "eval" / "metrics.json").read_text())["confusion_matrix"])
    assert cm.sum() == 50 and results["test/acc"] == pytest.approx(np.trace(cm) / 50)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(GalaxyError, match="not a galaxy_lightning checkpoint"):
        load_checkpoint(tmp_path / "bad.ckpt")
    result = subprocess.run([sys.executable, "-m", "galaxy_lightning.evaluate", str(tmp_path / "none.ckpt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_prediction_on_png_files_matches_predict_step(trained: tuple, tmp_path: Path) -> None:
    from PIL import Image

    ckpt, _, data_dir = trained
    module = load_checkpoint(ckpt)
    images = read_prepared(next(data_dir.glob("synthetic_*.h5"))).images[:12]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"galaxy_{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "wrong_size.png")
    done, skipped = predict(ckpt, [str(folder), str(tmp_path / "wrong_size.png")], tmp_path / "p.csv",
                            batch_size=5, progress=False)
    assert done == 12
    assert {Path(name).name for name, _ in skipped} == {"broken.png", "wrong_size.png"}
    assert any("is 40x50; the model takes 32x32" in reason and "--resize" in reason for _, reason in skipped)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [Path(r["file"]).name for r in rows] == [f"galaxy_{i:02d}.png" for i in range(12)]
    probs = np.array([[float(r[f"p_{n}"]) for n in module.hparams.class_names] for r in rows])
    with torch.no_grad():
        expected = module.predict_step(to_model_input(torch.from_numpy(images), module.hparams.scale), 0)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    assert [r["predicted_class"] for r in rows] == \
        [module.hparams.class_names[k] for k in expected.argmax(1).tolist()]
    # --resize accepts the odd size; an HDF5 array of images works too.
    done, skipped = predict(ckpt, [str(tmp_path / "wrong_size.png")], tmp_path / "q.csv",
                            allow_resize=True, progress=False)
    assert (done, skipped) == (1, [])
    import h5py

    with h5py.File(tmp_path / "batch.h5", "w") as f:
        f.create_dataset("cutouts", data=images)
    done, _ = predict(ckpt, [str(tmp_path / "batch.h5")], tmp_path / "h.csv", h5_key="cutouts", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "h.csv")))
    assert done == 12 and rows[3]["file"].endswith("batch.h5[3]")
    np.testing.assert_allclose([float(rows[3][f"p_{n}"]) for n in module.hparams.class_names],
                               expected[3].numpy(), atol=1e-5)


def test_prediction_applies_the_training_crop(trained: tuple) -> None:
    module = load_checkpoint(trained[0])
    module.hparams.crop, module.hparams.image_size = 32, 32
    big = np.zeros((80, 80, 3), np.uint8)
    big[24:56, 24:56] = 200  # the central 32x32 window
    out = preprocess(big, module)
    assert out.shape == (32, 32, 3) and (out == 200).all()


def test_export_agrees_with_the_checkpoint(trained: tuple, tmp_path: Path) -> None:
    ckpt = trained[0]
    module = load_checkpoint(ckpt)
    written = export(ckpt, tmp_path / "export")
    batch = example_input(module, batch=5)
    with torch.no_grad():
        expected = module.predict_step(to_model_input(batch, module.hparams.scale), 0).numpy()
    scripted = torch.jit.load(str(written["torchscript"]))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(batch).numpy(), expected, atol=1e-5)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(exportable(module)(batch).detach().numpy(), expected, atol=1e-6)
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["class_names"] == list(module.hparams.class_names) and meta["input"]["layout"] == "NHWC"


def test_dihedral_augmentation_is_exactly_a_symmetry() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (16, 12, 12, 3), dtype=torch.uint8, generator=gen)
    views = [dihedral(batch, k) for k in range(8)]
    assert len({v.numpy().tobytes() for v in views}) == 8  # 8 distinct symmetries
    inverse = {0: 0, 1: 3, 2: 2, 3: 1, 4: 4, 5: 5, 6: 6, 7: 7}  # reflections are involutions
    for k, view in enumerate(views):
        assert torch.equal(dihedral(view, inverse[k]), batch)
    out = random_dihedral(batch, torch.Generator().manual_seed(1))
    for i in range(16):  # each image is one of its own 8 views, with the same pixel statistics
        assert any(torch.equal(out[i], v[i]) for v in views)
        assert torch.equal(out[i].flatten().sort().values, batch[i].flatten().sort().values)


def test_augmented_training_keeps_labels(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("data.augment=dihedral")
    assert 0 <= train(cfg)["test/acc"] <= 1


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path: Path, data_dir: Path) -> None:
    from .conftest import TINY

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 20
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == 70  # every test image counted once across the two processes
    assert metrics["test_acc"] == pytest.approx(np.trace(cm) / 70)
    assert set(metrics) >= {"test_acc", "test_acc_per_class", "val_acc_best", "history"}


def test_train_false_tests_the_given_checkpoint(trained: tuple, make_cfg: Callable[..., DictConfig]) -> None:
    ckpt, metrics, _ = trained
    results = train(make_cfg("train=false", f"ckpt_path={ckpt}", run="test_only"))
    assert results["test/acc"] == metrics["test_acc"]
    with pytest.raises(GalaxyError, match="train=false needs ckpt_path"):
        train(make_cfg("train=false", run="no_ckpt"))
