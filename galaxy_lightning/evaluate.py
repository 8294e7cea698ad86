"""Evaluate a checkpoint without training: ``galaxy-evaluate CKPT [--prepared FILE] [--out DIR]``.

By default the checkpoint's own data config rebuilds the very test split it was tested on (same
file, same split seed), so the test accuracy of a training run is reproduced exactly. With
``--prepared FILE`` every image of another prepared file is evaluated instead. Writes what a
training run writes for its test: ``metrics.json``, ``confusion_matrix.png``,
``reliability_diagram.png`` and TensorBoard entries (test scalars, confusion-matrix image,
hparams), under the same names as training (``metrics.json``'s ``checkpoint`` names the
checkpoint evaluated, ``data`` the file). ``--tta`` / ``--no-tta`` switch test-time augmentation
on or off (default: as the run was configured).

A data file is refused unless its input spec is the model's (crop and resize aside: they say how
the source was cut, and a prepared file already has the training geometry; and the display, which
only says how a person sees the pixels): the same classes, channels and size, and pixels made the
same way (scale, FITS stretch and reading), since otherwise the model silently sees other input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L

from galaxy_lightning import perf
from galaxy_lightning.callbacks import RunArtifacts, progress_bar
from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.config import construct
from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.data.prepared import read_info
from galaxy_lightning.errors import CheckpointError, DataError, cli_boundary, config_key
from galaxy_lightning.files import write_atomic
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.loggers import tensorboard_logger
from galaxy_lightning.module import GalaxyClassifier

#: Input-spec fields that may differ between a data file and the model: how the source was cut
#: (a prepared file is already in the training geometry) and how to show pixels to a person.
NOT_COMPARED = ("crop", "resize", "display")
#: Fields that checkpoints written before they existed lack (None: not recorded, not "none"),
#: compared only when the checkpoint records them.
RECORDED_LATER = ("fits",)


class PreparedFile:
    """Data source for a prepared file that already exists."""

    def __init__(self, path: str) -> None:
        self.path = path

    def prepare(self, data_dir: str | Path, progress: bool = True) -> Path:
        return Path(self.path)


def evaluation_datamodule(module: GalaxyClassifier, prepared: str | None = None,
                          data_dir: str | None = None, batch_size: int | None = None
                          ) -> GalaxyDataModule:
    """The checkpoint's test split (or all of ``prepared``); refused unless its input spec gives
    the model what it was trained on (:func:`check_input_spec`)."""
    if prepared is not None:
        # a decision-tree model is measured on the questions too when the file has the votes
        votes = module.tree is not None and "votes" in read_info(prepared).columns
        datamodule = GalaxyDataModule(PreparedFile(prepared), test_only=True,
                                      eval_batch_size=batch_size or 1000, in_memory="auto",
                                      votes=votes)
    else:
        if not module.hparams.get("data"):
            raise CheckpointError("this checkpoint does not record its data config; pass a "
                                  "prepared file to evaluate")
        config: dict[str, Any] = dict(module.hparams.data)
        if data_dir is not None:
            config["data_dir"] = data_dir
        if batch_size is not None:
            config["eval_batch_size"] = batch_size
        # a file larger than the memory available is streamed (as training may have done)
        config["in_memory"] = False if config.get("in_memory") is False else "auto"
        config["device_resident"] = False  # one pass: nothing gained by keeping it on a GPU
        datamodule = construct(config, "data")
    with config_key("data"):
        datamodule.prepare_data()
    check_input_spec(datamodule.spec, module.spec, datamodule.path)
    return datamodule


def _plain(value: Any) -> Any:
    """JSON's view of a value, so that (1, 2) == [1, 2] as they do after a file round trip."""
    return json.loads(json.dumps(value))


def check_input_spec(data: InputSpec, model: InputSpec, path: str | Path) -> None:
    """Refuse data whose pixels are not what the model was trained on, naming the first field
    that differs (every field but :data:`NOT_COMPARED`; :data:`RECORDED_LATER` ones when the
    checkpoint has them)."""
    if data.class_names != model.class_names:
        raise DataError(f"{path}: classes {list(data.class_names)} differ from the "
                        f"checkpoint's {list(model.class_names)}")
    if (data.channels, data.image_size) != (model.channels, model.image_size):
        raise DataError(f"{path}: images are {data.image_size}x{data.image_size}x"
                        f"{data.channels}; the model takes {model.image_size}x{model.image_size}x"
                        f"{model.channels}")
    for f in dataclasses.fields(InputSpec):
        if f.name in NOT_COMPARED:
            continue
        mine, theirs = _plain(getattr(data, f.name)), _plain(getattr(model, f.name))
        if theirs is None and f.name in RECORDED_LATER:
            continue
        if f.name == "tree" and (mine is None or theirs is None):
            continue  # vote counts beside the pixels: they do not change what the model sees
        if mine != theirs:
            raise DataError(f"{path}: input spec {f.name}={json.dumps(mine, sort_keys=True)} "
                            f"differs from the checkpoint's {f.name}="
                            f"{json.dumps(theirs, sort_keys=True)}, so the model "
                            "would see other pixels than it was trained on; prepare the file "
                            f"with the training data's {f.name}")


def evaluate(checkpoint: str | Path, output_dir: str | Path, prepared: str | None = None,
             data_dir: str | None = None, batch_size: int | None = None,
             accelerator: str = "auto", tta: bool | None = None,
             calibrated: bool | None = None) -> dict[str, float]:
    """Test ``checkpoint``; write metrics.json, confusion_matrix.png, reliability_diagram.png and
    TensorBoard events. ``tta`` (test-time augmentation over the 8 symmetric views) and
    ``calibrated`` (the fitted temperature) default to the run's own settings."""
    perf.tune_malloc()
    module = load_classifier(checkpoint).set_inference(tta=tta, calibrated=calibrated)
    datamodule = evaluation_datamodule(module, prepared, data_dir, batch_size)
    output_dir = Path(output_dir)
    logger = tensorboard_logger(output_dir)
    # The project's progress bar: Rich on a terminal, plain lines when redirected (tqdm's default
    # bar would write carriage-return fragments into a log file).
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=logger,
                        callbacks=[RunArtifacts(str(output_dir)), progress_bar()],
                        enable_model_summary=False, enable_checkpointing=False)
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    # metrics.json has training's keys (`checkpoint`: the one evaluated here, which the module
    # records), and `data` says on which file.
    written = output_dir / "metrics.json"
    if written.is_file():
        metrics = json.loads(written.read_text())
        metrics.update(data=str(datamodule.path))
        write_atomic(written, json.dumps(metrics, indent=2))
    logger.log_hyperparams({"checkpoint": str(checkpoint), "data": str(datamodule.path),
                            **module.inference},
                           metrics={k: results[k] for k in ("test/acc", "test/ece")}, step=0)
    return {k: float(v) for k, v in results.items()}


def default_output_dir(root: str | Path = Path("logs") / "eval") -> Path:
    """``logs/eval/<time>``, to the microsecond as run directories are, so that two evaluations
    started in the same second do not write into one folder."""
    return Path(root) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by galaxy-train")
    parser.add_argument("--prepared", help="evaluate every image of this prepared file instead")
    parser.add_argument("--data-dir", help="where the checkpoint's data lives now (default: as in training)")
    parser.add_argument("--out", help="output folder (default: logs/eval/<time>)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the softmax over the 8 rotations/flips of each image "
                             "(default: as the run was configured)")
    parser.add_argument("--calibrated", action=argparse.BooleanOptionalAction, default=None,
                        help="divide the logits by the fitted temperature (default: as the run)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_output_dir()
    results = evaluate(args.checkpoint, out, args.prepared, args.data_dir, args.batch_size,
                       args.accelerator, args.tta, args.calibrated)
    print(f"test accuracy {results['test/acc']:.4f} (loss {results['test/loss']:.4f}, ECE "
          f"{results['test/ece']:.4f}); outputs in {out}")


if __name__ == "__main__":
    main()
