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
import sys
from pathlib import Path

import torch
from torch import nn

from galaxy_lightning.errors import GalaxyError
from galaxy_lightning.evaluate import load_checkpoint
from galaxy_lightning.module import GalaxyClassifier


class ExportedClassifier(nn.Module):
    """uint8 (N, H, W, C) -> probabilities (N, K), preprocessing included."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale
        return torch.softmax(self.net(x), dim=1)


def exportable(module: GalaxyClassifier) -> ExportedClassifier:
    return ExportedClassifier(module.net, float(module.hparams.scale)).eval()


def example_input(module: GalaxyClassifier, batch: int = 2) -> torch.Tensor:
    hp = module.hparams
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, hp.image_size, hp.image_size, hp.in_channels),
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
        raise GalaxyError("ONNX export needs the onnx extra: pip install -e \".[onnx]\"") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(exportable(module), (example_input(module),), str(path), dynamo=True,
                      input_names=["images"], output_names=["probabilities"],
                      dynamic_shapes={"images": {0: batch}}, verbose=False)
    return path


def export(checkpoint: str | Path, out_dir: str | Path,
           formats: tuple[str, ...] = ("torchscript", "onnx")) -> dict[str, Path]:
    """Write the requested formats plus ``model.json`` (classes, input geometry) into ``out_dir``."""
    module = load_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "torchscript":
            written[fmt] = export_torchscript(module, out_dir / "model.torchscript.pt")
        elif fmt == "onnx":
            written[fmt] = export_onnx(module, out_dir / "model.onnx")
        else:
            raise GalaxyError(f"unknown export format {fmt!r}; use torchscript or onnx")
    hp = module.hparams
    (out_dir / "model.json").write_text(json.dumps({
        "input": {"dtype": "uint8", "layout": "NHWC", "height": hp.image_size, "width": hp.image_size,
                  "channels": hp.in_channels, "source_crop": hp.get("crop"), "resize": hp.get("resize")},
        "output": "class probabilities (N, K)", "class_names": list(hp.class_names),
        "checkpoint": str(checkpoint), "files": {k: v.name for k, v in written.items()}}, indent=2))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py")
    parser.add_argument("--out", default="export", help="output folder (export/)")
    parser.add_argument("--format", nargs="+", default=["torchscript", "onnx"],
                        choices=["torchscript", "onnx"])
    args = parser.parse_args(argv)
    try:
        written = export(args.checkpoint, args.out, tuple(args.format))
    except GalaxyError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for fmt, path in written.items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    main()
