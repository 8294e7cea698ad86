"""Evaluation, prediction and export of a trained checkpoint; checkpoints of the older format;
the installable package."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from galaxy_lightning.checkpoints import load_classifier, read_checkpoint
from galaxy_lightning.data.prepared import read_prepared
from galaxy_lightning.data.synthetic import SyntheticGalaxies
from galaxy_lightning.errors import CheckpointError, ConfigError, DataError
from galaxy_lightning.evaluate import (
    check_input_spec,
    default_output_dir,
    evaluate,
    evaluation_datamodule,
)
from galaxy_lightning.evaluate import main as evaluate_main
from galaxy_lightning.export import (
    METADATA_KEY,
    example_input,
    export,
    export_program,
    exportable,
    load_exported,
)
from galaxy_lightning.input_spec import InputSpec, resize_uint8
from galaxy_lightning.predict import predict
from galaxy_lightning.train import train

from .conftest import TINY
from .helpers import write_prepared

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


#: The tiny run's prepared file in the session's data directory (which holds other sets too).
TINY_DATA = SyntheticGalaxies(n_per_class=60, image_size=32, seed=0).filename


@pytest.fixture
def trained(tiny_run: tuple[Path, dict, Path]) -> tuple[Path, dict, Path]:
    """The session's tiny run (conftest.py): (best checkpoint, metrics.json, data dir)."""
    return tiny_run


def test_evaluation_reproduces_the_test_accuracy_exactly(trained: tuple, tmp_path: Path) -> None:
    ckpt, metrics, _ = trained
    results = evaluate(ckpt, tmp_path / "eval")
    assert results["test/acc"] == metrics["test/acc"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["test/confusion_matrix"] == metrics["test/confusion_matrix"]
    per_class = [k for k in metrics if k.startswith("test/acc_class/")]
    assert len(per_class) == 7 and all(written[k] == metrics[k] for k in per_class)
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    assert list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    # training's names (and only `data` more); `checkpoint` is the one evaluated
    assert set(written) - set(metrics) == {"data"} and set(metrics) <= set(written)
    assert written["checkpoint"] == str(ckpt) and written["data"].endswith(".h5")


def test_evaluation_with_test_time_augmentation(trained: tuple, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    ckpt, metrics, _ = trained
    evaluate_main([str(ckpt), "--tta", "--out", str(tmp_path / "eval")])
    out, err = capsys.readouterr()
    # redirected: the project's line-based bar (nothing while testing), not a live bar's frames
    assert [line for line in out.splitlines() if line.strip()] == [out.strip()]
    assert out.startswith("test accuracy") and "ECE" in out and "\r" not in out + err
    assert len({default_output_dir() for _ in range(3)}) == 3  # never one folder for two
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["tta"] is True and metrics["tta"] is False
    assert (tmp_path / "eval" / "reliability_diagram.png").is_file()
    module = load_classifier(ckpt)
    assert module.tta is False  # the run's own choice is the default
    test = evaluation_datamodule(module).split("test")
    with torch.no_grad():
        log_probs = module.log_probs(module.preprocess(test.images), tta=True)
    assert written["test/acc"] == pytest.approx((log_probs.argmax(1) == test.labels).float().mean().item())
    assert written["test/loss"] == pytest.approx(F.nll_loss(log_probs, test.labels).item(), rel=1e-5)


def test_evaluation_of_another_prepared_file_and_bad_checkpoints(trained: tuple, tmp_path: Path) -> None:
    ckpt, _, data_dir = trained
    source = read_prepared(data_dir / TINY_DATA)
    other = write_prepared(tmp_path / "other.h5", source.images[:50], source.labels[:50],
                           source.info.spec, {"source": "test"})
    results = evaluate(ckpt, tmp_path / "eval", prepared=str(other))
    cm = np.array(json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/confusion_matrix"])
    assert cm.sum() == 50 and results["test/acc"] == pytest.approx(np.trace(cm) / 50)
    renamed = write_prepared(tmp_path / "renamed.h5", source.images[:50], source.labels[:50],
                             source.info.spec.replace(class_names=tuple("abcdefg")), {})
    with pytest.raises(DataError, match="differ from the checkpoint's"):
        evaluate(ckpt, tmp_path / "eval2", prepared=str(renamed))
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_classifier(tmp_path / "bad.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a galaxy_lightning checkpoint"):
        read_checkpoint(tmp_path / "other.ckpt")


def test_evaluation_refuses_a_file_whose_pixels_were_made_otherwise(trained: tuple,
                                                                    tmp_path: Path) -> None:
    ckpt, _, data_dir = trained
    module = load_classifier(ckpt)
    source = read_prepared(data_dir / TINY_DATA)
    images, labels, spec = source.images[:20], source.labels[:20], source.info.spec
    stretch = {"kind": "asinh", "interval": "percentile", "percentile": 99.5}
    for name, value in (("scale", 1.0 / 255.0), ("stretch", stretch)):
        path = write_prepared(tmp_path / f"{name}.h5", images, labels, spec.replace(**{name: value}), {})
        with pytest.raises(DataError) as refused:
            evaluation_datamodule(module, prepared=str(path))
        message = str(refused.value)
        assert message.startswith(f"{path}: input spec {name}={json.dumps(value, sort_keys=True)} "
                                  f"differs from the checkpoint's {name}="
                                  f"{json.dumps(getattr(module.spec, name))}")
        assert message.endswith(f"prepare the file with the training data's {name}")
        assert "\n" not in message
    # how the source was cut and how pixels are shown do not change what the model sees
    recut = write_prepared(tmp_path / "recut.h5", images, labels,
                           spec.replace(crop=48, resize=32, display={"stretch": "asinh"}), {})
    assert len(evaluation_datamodule(module, prepared=str(recut)).split("test").labels) == 20
    # how FITS files were read: compared when the checkpoint records it (older ones do not)
    fits = {"hdu": 1, "nan": "zero"}
    check_input_spec(spec.replace(fits=fits), spec, "f.h5")
    with pytest.raises(DataError, match=r'^f.h5: input spec fits=null differs from the '
                                        r'checkpoint\'s fits=\{"hdu": 1, "nan": "zero"\}'):
        check_input_spec(spec, spec.replace(fits=fits), "f.h5")


def test_prediction_on_png_files_matches_predict_step(trained: tuple, tmp_path: Path) -> None:
    from PIL import Image

    ckpt, _, data_dir = trained
    module = load_classifier(ckpt)
    images = read_prepared(data_dir / TINY_DATA).images[:12]
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
    probs = np.array([[float(r[f"p_{n}"]) for n in module.class_names] for r in rows])
    with torch.no_grad():  # the same probabilities as the test step computes on the same pixels
        expected = module.predict_step(module.preprocess(torch.from_numpy(images)), 0)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    assert [r["predicted_class"] for r in rows] == \
        [module.class_names[k] for k in expected.argmax(1).tolist()]
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
    np.testing.assert_allclose([float(rows[3][f"p_{n}"]) for n in module.class_names],
                               expected[3].numpy(), atol=1e-5)


def test_prediction_applies_the_training_crop(trained: tuple, tmp_path: Path) -> None:
    from PIL import Image

    module = load_classifier(trained[0])
    spec = module.spec.replace(crop=32)
    big = np.zeros((80, 80, 3), np.uint8)
    big[24:56, 24:56] = 200  # the central 32x32 window
    out = spec.conform(big[None])[0]
    assert out.shape == (32, 32, 3) and (out == 200).all()
    # prediction goes through the same geometry: an 80 px cutout gives the crop's probabilities
    ckpt = tmp_path / "crop.ckpt"
    checkpoint = torch.load(trained[0], weights_only=True)
    checkpoint["hyper_parameters"]["input_spec"] = spec.to_dict()
    torch.save(checkpoint, ckpt)
    Image.fromarray(big).save(tmp_path / "big.png")
    assert predict(ckpt, [str(tmp_path / "big.png")], tmp_path / "p.csv", progress=False) == (1, [])
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    expected = module.probabilities(torch.from_numpy(out[None]))[0]
    np.testing.assert_allclose([float(row[f"p_{n}"]) for n in module.class_names], expected, atol=1e-5)


def _checkpoint_with_a_crop(trained: tuple, path: Path) -> tuple[Path, InputSpec]:
    """The trained checkpoint with a Galaxy10 DECaLS-like source geometry: 64 px cutouts,
    center-cropped to 48 and resized to the 32 px the network takes."""
    checkpoint = torch.load(trained[0], weights_only=True)
    spec = InputSpec.from_dict(checkpoint["hyper_parameters"]["input_spec"]).replace(crop=48, resize=32)
    checkpoint["hyper_parameters"]["input_spec"] = spec.to_dict()
    torch.save(checkpoint, path)
    return path, spec


@pytest.mark.parametrize("tta", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_export_agrees_with_the_checkpoint(trained: tuple, tmp_path: Path, tta: bool) -> None:
    import warnings

    import onnx
    import onnxruntime

    ckpt, spec = _checkpoint_with_a_crop(trained, tmp_path / "crop.ckpt")
    module = load_classifier(ckpt).set_inference(tta=tta)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated exporter on the way
        written = export(ckpt, tmp_path / "export", tta=tta)
    batch = example_input(module, batch=5)  # another batch size than the one exported with
    expected = module.probabilities(batch).numpy()
    program = torch.export.load(str(written["pt2"])).module()
    with torch.no_grad():
        np.testing.assert_allclose(program(batch).numpy(), expected, atol=1e-5)
    session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(exportable(module)(batch).detach().numpy(), expected, atol=1e-6)
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["class_names"] == module.class_names and meta["input"]["layout"] == "NHWC"
    assert InputSpec.from_dict(meta["input_spec"]) == module.spec and meta["inference"]["tta"] is tta
    # the input spec and inference options travel inside each file, read by each format's tools
    extra = {METADATA_KEY: ""}
    torch.export.load(str(written["pt2"]), extra_files=extra)
    props = {p.key: p.value for p in onnx.load(str(written["onnx"])).metadata_props}
    for text in (extra[METADATA_KEY], props[METADATA_KEY]):
        embedded = json.loads(text)
        assert InputSpec.from_dict(embedded["input_spec"]) == module.spec == spec
        assert embedded["inference"] == meta["inference"]
    # the loader applies the training geometry: raw 64 px cutouts give the checkpoint's
    # probabilities of their crop (cut here by hand), in batches of any size
    raw = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    cropped = resize_uint8(raw[:, 8:56, 8:56], 32)
    expected_raw = module.probabilities(torch.from_numpy(cropped)).numpy()
    for fmt, path in written.items():
        model = load_exported(path)
        assert model.spec == module.spec and model.inference["tta"] is tta, fmt
        np.testing.assert_allclose(model(raw, batch_size=2), expected_raw, atol=1e-5, err_msg=fmt)
        np.testing.assert_allclose(model(batch), expected, atol=1e-5, err_msg=fmt)  # already 32 px
        with pytest.raises(ConfigError, match=r"is 40x50; the model takes 32x32 \(training cropped"):
            model(raw[:, :40, :50])
        assert model(raw[:, :40, :50], allow_resize=True).shape == (5, module.spec.num_classes)
    with pytest.raises(ConfigError, match="TorchScript is deprecated"):
        export(ckpt, tmp_path / "ts", formats=("torchscript",))


def test_exported_files_without_their_input_spec_are_refused(trained: tuple, tmp_path: Path) -> None:
    module = load_classifier(trained[0])
    bare = tmp_path / "bare.pt2"
    torch.export.save(export_program(module), str(bare))  # an ExportedProgram with no spec
    with pytest.raises(CheckpointError, match="carries no galaxy_lightning input spec"):
        load_exported(bare)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_exported(tmp_path / "junk.onnx")
    with pytest.raises(ConfigError, match="unknown exported model type"):
        load_exported(trained[0])
    model = load_exported(export(trained[0], tmp_path / "export", formats=("pt2",))["pt2"])
    with pytest.raises(ConfigError, match="the model takes uint8"):
        model(np.zeros((2, 32, 32, 3), np.float32))


def test_train_false_tests_the_given_checkpoint(trained: tuple, make_cfg) -> None:  # noqa: ANN001
    ckpt, metrics, _ = trained
    results = train(make_cfg("train=false", f"ckpt_path={ckpt}", run="test_only"))
    assert results["test/acc"] == metrics["test/acc"]
    with pytest.raises(ConfigError, match="train=false needs ckpt_path"):
        train(make_cfg("train=false", run="no_ckpt"))


# -- checkpoints written before the input spec (format 1) ---------------------------------------
@pytest.fixture(scope="module")
def version_1(tmp_path_factory: pytest.TempPathFactory,
              tiny_run: tuple[Path, dict, Path]) -> tuple[Path, dict, Path]:
    """A checkpoint written by galaxy_lightning 69f6dd5 (format 1) with what that code computed
    with it (test accuracy, confusion matrix, probabilities), and the data it was trained on: the
    tiny config's simulated set, which the session's tiny run prepared."""
    expected = json.loads((FIXTURES / "v1_tutorial_cnn_32px.json").read_text())
    ckpt = tmp_path_factory.mktemp("v1") / "v1.ckpt"
    shutil.copy(FIXTURES / "v1_tutorial_cnn_32px.ckpt", ckpt)
    return ckpt, expected, tiny_run[2]


def test_version_1_checkpoints_evaluate_and_predict_as_before(version_1: tuple, tmp_path: Path) -> None:
    ckpt, expected, data_dir = version_1
    assert read_checkpoint(ckpt).get("galaxy_lightning") is None  # really the old format
    module = load_classifier(ckpt)
    assert module.spec.image_size == 32 and module.tta is False
    results = evaluate(ckpt, tmp_path / "eval", data_dir=str(data_dir))
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert results["test/acc"] == pytest.approx(expected["test_acc"])
    assert written["test/confusion_matrix"] == expected["confusion_matrix"]
    test = evaluation_datamodule(module, data_dir=str(data_dir)).split("test")
    probs = module.probabilities(test.images[:8])
    np.testing.assert_allclose(probs, expected["probabilities_first_8_test_images"], atol=1e-6)
    probs = module.set_inference(tta=True).probabilities(test.images[:8])
    np.testing.assert_allclose(probs, expected["probabilities_first_8_test_images_tta"], atol=1e-6)
    written = export(ckpt, tmp_path / "export", formats=("pt2",))
    assert written["pt2"].is_file()


def test_version_1_checkpoints_are_not_resumed(version_1: tuple, make_cfg) -> None:  # noqa: ANN001
    ckpt, _, _ = version_1
    with pytest.raises(CheckpointError, match="older galaxy_lightning .* not resumed: start a new run"):
        train(make_cfg(f"ckpt_path={ckpt}"))
    results = train(make_cfg("train=false", f"ckpt_path={ckpt}", run="tested"))  # testing is fine
    assert 0 <= results["test/acc"] <= 1


# -- the installable package ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script, args", [("galaxy-evaluate", []), ("galaxy-predict", ["x.png"]),
                                          ("galaxy-export", []), ("galaxy-stretch", None)])
def test_every_console_script_refuses_bad_input_in_one_line(tmp_path: Path, script: str,
                                                            args: list[str] | None) -> None:
    """The process boundary of each installed command (the tests call their main() in-process
    otherwise): a missing input is one line on stderr and exit status 2, no traceback."""
    command = Path(sys.executable).parent / script  # where pip installed the console script
    assert command.is_file(), f"{command} is missing: pip install -e . installs it"
    argv = [str(tmp_path / "none.fits")] if args is None else [str(tmp_path / "none.ckpt"), *args]
    result = subprocess.run([str(command), *argv], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_trains_outside_the_checkout(tmp_path: Path,
                                                                    data_dir: Path) -> None:
    wheels = tmp_path / "wheels"
    build_wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                                  "--no-build-isolation", "-w", str(wheels), "-q"],
                                 capture_output=True, text=True, timeout=600)
    assert build_wheel.returncode == 0, build_wheel.stderr[-2000:]
    (wheel,) = wheels.glob("galaxy_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"galaxy_lightning/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names  # every config ships inside the package
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(target), str(wheel)], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import galaxy_lightning; print(galaxy_lightning.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(target))  # the wheel's copy, not the checkout
    run = subprocess.run([str(target / "bin" / "galaxy-train"), *TINY, "logger=none",
                          f"paths.data_dir={data_dir}"],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (metrics,) = (elsewhere / "logs" / "train" / "runs").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["global_step"] == 20
