"""Ship a trained model: ``galaxy-export CKPT --out DIR [--format pt2 onnx]``.

The exported model takes what a user has, uint8 images (N, H, W, C) already in the training
geometry, and returns class probabilities (N, K): the model's own preprocessing (pixel scaling,
NHWC -> NCHW), the network, the run's inference options (the calibration temperature, and the 8
symmetric views when the run used test-time augmentation; ``--tta``/``--no-tta`` choose) and the
softmax travel inside it. ``model.json`` beside it carries the input spec: class names, the
source crop and resize to apply to larger cutouts, and the FITS stretch.

Formats: ``pt2``, an ExportedProgram from ``torch.export`` (load with ``torch.export.load(path)
.module()``), and ``onnx``, from torch's dynamo-based ONNX exporter (the ``onnx`` extra:
``pip install -e ".[onnx]"``). Both have a dynamic batch size. TorchScript is not written: torch
2.13 deprecates it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.errors import ConfigError, cli_boundary
from galaxy_lightning.module import GalaxyClassifier

FORMATS = {"pt2": "model.pt2", "onnx": "model.onnx"}


class ExportedClassifier(nn.Module):
    """uint8 (N, H, W, C) -> probabilities (N, K) with the classifier's preprocessing and
    inference options: what :meth:`GalaxyClassifier.probabilities` computes."""

    def __init__(self, module: GalaxyClassifier) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.log_probs(self.module.preprocess(images), self.module.tta).exp()


def exportable(module: GalaxyClassifier) -> ExportedClassifier:
    return ExportedClassifier(module).eval()


def example_input(module: GalaxyClassifier, batch: int = 2) -> torch.Tensor:
    spec = module.spec
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, spec.image_size, spec.image_size, spec.channels),
                         dtype=torch.uint8, generator=gen)


def _dynamic_batch() -> dict[str, dict[int, torch.export.Dim]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


def export_program(module: GalaxyClassifier) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(exportable(module), (example_input(module),),
                                   dynamic_shapes=_dynamic_batch())


def export_pt2(module: GalaxyClassifier, path: Path) -> Path:
    torch.export.save(export_program(module), str(path))
    return path


def export_onnx(module: GalaxyClassifier, path: Path) -> Path:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install -e \".[onnx]\"") from None
    torch.onnx.export(exportable(module), (example_input(module),), str(path), dynamo=True,
                      input_names=["images"], output_names=["probabilities"],
                      dynamic_shapes=_dynamic_batch(), verbose=False)
    return path


def export(checkpoint: str | Path, out_dir: str | Path, formats: tuple[str, ...] = ("pt2", "onnx"),
           tta: bool | None = None) -> dict[str, Path]:
    """Write the requested formats plus ``model.json`` (the input spec, the classes, the inference
    options) into ``out_dir``."""
    for fmt in formats:
        if fmt == "torchscript":
            raise ConfigError("TorchScript is deprecated in torch 2.13 and no longer written; use "
                              "--format pt2 (torch.export) or onnx")
        if fmt not in FORMATS:
            raise ConfigError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    module = load_classifier(checkpoint).set_inference(tta=tta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"pt2": export_pt2, "onnx": export_onnx}
    written = {fmt: writers[fmt](module, out_dir / FORMATS[fmt]) for fmt in formats}
    spec = module.spec
    (out_dir / "model.json").write_text(json.dumps({
        "input": {"dtype": "uint8", "layout": "NHWC", "height": spec.image_size,
                  "width": spec.image_size, "channels": spec.channels},
        "input_spec": spec.to_dict(),
        "inference": {**module.inference, "temperature": float(module.temperature)},
        "output": "class probabilities (N, K)", "class_names": list(spec.class_names),
        "checkpoint": str(checkpoint), "files": {k: v.name for k, v in written.items()}}, indent=2))
    return written


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by galaxy-train")
    parser.add_argument("--out", default="export", help="output folder (export/)")
    parser.add_argument("--format", nargs="+", default=list(FORMATS), choices=[*FORMATS, "torchscript"])
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over the 8 rotations/flips inside the exported model "
                             "(default: as the run was configured)")
    args = parser.parse_args(argv)
    written = export(args.checkpoint, args.out, tuple(args.format), args.tta)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    main()
