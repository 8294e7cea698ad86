"""Evaluate a checkpoint without training: ``galaxy-evaluate CKPT [--prepared FILE] [--out DIR]``.

By default the checkpoint's own data config rebuilds the very test split it was tested on (same
file, same split seed), so the test accuracy of a training run is reproduced exactly. With
``--prepared FILE`` every image of another prepared file is evaluated instead. Writes what a
training run writes for its test: ``metrics.json``, ``confusion_matrix.png``,
``reliability_diagram.png`` and TensorBoard entries (test scalars, confusion-matrix image,
hparams). ``--tta`` / ``--no-tta`` switch test-time augmentation on or off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from galaxy_lightning import perf
from galaxy_lightning.callbacks import RunArtifacts
from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.data.prepared import read_info
from galaxy_lightning.errors import GalaxyError
from galaxy_lightning.module import GalaxyClassifier


class PreparedFile:
    """Data source for a prepared file that already exists."""

    def __init__(self, path: str) -> None:
        self.path = path

    def prepare(self, data_dir: str | Path, progress: bool = True) -> Path:
        return Path(self.path)


def load_checkpoint(path: str | Path) -> GalaxyClassifier:
    """The LightningModule of a checkpoint, on the CPU, in eval mode, with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise GalaxyError(f"{path}: checkpoint not found; pass a .ckpt file from a run's "
                          "checkpoints/ folder")
    try:
        module = GalaxyClassifier.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch/Lightning raise many types for a bad file
        raise GalaxyError(f"{path}: not a galaxy_lightning checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return module.eval()


def evaluation_datamodule(module: GalaxyClassifier, prepared: str | None = None,
                          data_dir: str | None = None, batch_size: int | None = None
                          ) -> GalaxyDataModule:
    """The checkpoint's test split (or all of ``prepared``), preprocessed as in training."""
    hp = module.hparams
    if prepared is not None:
        info = read_info(prepared)
        if info.class_names != list(hp.class_names):
            raise GalaxyError(f"{prepared}: classes {info.class_names} differ from the "
                              f"checkpoint's {list(hp.class_names)}")
        datamodule = GalaxyDataModule(PreparedFile(prepared), scale=hp.scale, test_only=True,
                                      eval_batch_size=batch_size or 1000)
    else:
        if not hp.get("data"):
            raise GalaxyError("this checkpoint does not record its data config; pass --prepared FILE")
        config: dict[str, Any] = dict(hp.data)
        if data_dir is not None:
            config["data_dir"] = data_dir
        if batch_size is not None:
            config["eval_batch_size"] = batch_size
        datamodule = instantiate(config, _convert_="all")
    datamodule.prepare_data()
    info = datamodule.info
    if (info.channels, info.height) != (hp.in_channels, hp.image_size):
        raise GalaxyError(f"{info.path}: images are {info.height}x{info.width}x{info.channels}; the "
                          f"model takes {hp.image_size}x{hp.image_size}x{hp.in_channels}")
    return datamodule


def evaluate(checkpoint: str | Path, output_dir: str | Path, prepared: str | None = None,
             data_dir: str | None = None, batch_size: int | None = None,
             accelerator: str = "auto", tta: bool | None = None) -> dict[str, float]:
    """Test ``checkpoint``; write metrics.json, confusion_matrix.png, reliability_diagram.png and
    TensorBoard events. ``tta`` (test-time augmentation over the 8 symmetric views) defaults to
    the checkpoint's own setting."""
    perf.tune_malloc()
    module = load_checkpoint(checkpoint)
    if tta is not None:
        module.hparams.tta = tta
    datamodule = evaluation_datamodule(module, prepared, data_dir, batch_size)
    output_dir = Path(output_dir)
    logger = TensorBoardLogger(str(output_dir), name="tensorboard", version="", default_hp_metric=False)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=logger,
                        callbacks=[RunArtifacts(str(output_dir))], enable_model_summary=False)
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    logger.log_hyperparams({"checkpoint": str(checkpoint), "data": str(datamodule.path)},
                           {"hparams/test_acc": results["test/acc"]})
    return {k: float(v) for k, v in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py")
    parser.add_argument("--prepared", help="evaluate every image of this prepared file instead")
    parser.add_argument("--data-dir", help="where the checkpoint's data lives now (default: as in training)")
    parser.add_argument("--out", help="output folder (default: logs/eval/<time>)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the softmax over the 8 rotations/flips of each image "
                             "(default: as the run was configured)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path("logs") / "eval" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    try:
        results = evaluate(args.checkpoint, out, args.prepared, args.data_dir, args.batch_size,
                           args.accelerator, args.tta)
    except GalaxyError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"test accuracy {results['test/acc']:.4f} (loss {results['test/loss']:.4f}, ECE "
          f"{results['test/ece']:.4f}); outputs in {out}")


if __name__ == "__main__":
    main()
