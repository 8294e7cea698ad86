"""Ship a trained model: ``galaxy-export CKPT --out DIR [--format torchscript onnx]``.

The exported model takes what a user has, uint8 images (N, H, W, C) already cropped to the
training size, and returns class probabilities (N, K): the pixel scaling, the NHWC -> NCHW
layout and the softmax travel inside it. A JSON file beside it names the classes and the input
geometry. TorchScript uses ``torch.jit.trace``; ONNX uses ``torch.onnx.export`` (the exporter
that ships with torch; it needs the ``onnx`` extra: ``pip install -e ".[onnx]"``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.errors import ConfigError, cli_boundary
from galaxy_lightning.input_spec import Preprocess
from galaxy_lightning.module import GalaxyClassifier


class ExportedClassifier(nn.Module):
    """uint8 (N, H, W, C) -> probabilities (N, K): the model's own :class:`Preprocess`, the
    network and the softmax."""

    def __init__(self, preprocess: Preprocess, net: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(self.preprocess(images)), dim=1)


def exportable(module: GalaxyClassifier) -> ExportedClassifier:
    return ExportedClassifier(module.preprocess, module.net).eval()


def example_input(module: GalaxyClassifier, batch: int = 2) -> torch.Tensor:
    spec = module.spec
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, spec.image_size, spec.image_size, spec.channels),
                         dtype=torch.uint8, generator=gen)


def export_torchscript(module: GalaxyClassifier, path: Path) -> Path:
    with torch.no_grad():
        traced = torch.jit.trace(exportable(module), example_input(module))
    traced.save(str(path))
    return path


def export_onnx(module: GalaxyClassifier, path: Path) -> Path:
    try:
        import onnxscript  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install -e \".[onnx]\"") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(exportable(module), (example_input(module),), str(path), dynamo=True,
                      input_names=["images"], output_names=["probabilities"],
                      dynamic_shapes={"images": {0: batch}}, verbose=False)
    return path


def export(checkpoint: str | Path, out_dir: str | Path,
           formats: tuple[str, ...] = ("torchscript", "onnx")) -> dict[str, Path]:
    """Write the requested formats plus ``model.json`` (classes, input geometry) into ``out_dir``."""
    module = load_classifier(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "torchscript":
            written[fmt] = export_torchscript(module, out_dir / "model.torchscript.pt")
        elif fmt == "onnx":
            written[fmt] = export_onnx(module, out_dir / "model.onnx")
        else:
            raise ConfigError(f"unknown export format {fmt!r}; use torchscript or onnx")
    spec = module.spec
    (out_dir / "model.json").write_text(json.dumps({
        "input": {"dtype": "uint8", "layout": "NHWC", "height": spec.image_size,
                  "width": spec.image_size, "channels": spec.channels},
        "input_spec": spec.to_dict(),
        "output": "class probabilities (N, K)", "class_names": list(spec.class_names),
        "checkpoint": str(checkpoint), "files": {k: v.name for k, v in written.items()}}, indent=2))
    return written


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by galaxy-train")
    parser.add_argument("--out", default="export", help="output folder (export/)")
    parser.add_argument("--format", nargs="+", default=["torchscript", "onnx"],
                        choices=["torchscript", "onnx"])
    args = parser.parse_args(argv)
    written = export(args.checkpoint, args.out, tuple(args.format))
    for fmt, path in written.items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    main()
