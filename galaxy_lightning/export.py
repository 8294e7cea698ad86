"""Ship a trained model: ``galaxy-export CKPT --out DIR [--format pt2 onnx]``.

The exported model takes uint8 images (N, H, W, C) in the training geometry and returns class
probabilities (N, K): the model's own preprocessing (pixel scaling, NHWC -> NCHW), the network,
the run's inference options (the calibration temperature, and the 8 symmetric views when the run
used test-time augmentation; ``--tta``/``--no-tta`` choose) and the softmax travel inside it.

The input spec (class names, the source crop and resize for larger cutouts, the pixel scale, the
FITS stretch) and the inference options travel *inside* each file, as one JSON document under
:data:`METADATA_KEY`: an extra file of the ``.pt2`` archive and a ``metadata_props`` entry of the
ONNX model, so a file that is copied alone still says how to feed it. ``model.json`` beside them
is the same document for people to read. :func:`load_exported` reads the embedded spec and applies
:meth:`InputSpec.conform` (the one crop/resize implementation) before the program, so a user
passes raw cutouts of any size training covered (e.g. 256 px Galaxy10 DECaLS) and gets the
checkpoint's probabilities.

Formats: ``pt2``, an ExportedProgram from ``torch.export`` (``torch.export.load(path).module()``
runs it on images already in the training geometry), and ``onnx``, from torch's dynamo-based ONNX
exporter (the ``onnx`` extra: ``pip install -e ".[onnx]"``). Both have a dynamic batch size.
TorchScript is not written: torch 2.13 deprecates it.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.errors import CheckpointError, ConfigError, cli_boundary
from galaxy_lightning.files import atomic_file, atomic_path, write_atomic
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.decision_tree import DecisionTree, predicted_fractions
from galaxy_lightning.module import GalaxyClassifier

FORMATS = {"pt2": "model.pt2", "onnx": "model.onnx"}
#: Name of the embedded JSON document: the .pt2 archive's extra file and the ONNX metadata key.
METADATA_KEY = "galaxy_lightning.json"
#: Version of that document; a reader refuses a newer one instead of misreading it.
METADATA_FORMAT = 1


class ExportedClassifier(nn.Module):
    """uint8 (N, H, W, C) -> probabilities (N, K) with the classifier's preprocessing and
    inference options: what :meth:`GalaxyClassifier.probabilities` computes; a decision-tree
    model appends every answer's predicted vote fraction, (N, K + A), as
    :meth:`GalaxyClassifier.answer_fractions` (one output, so that ONNX and .pt2 read alike)."""

    def __init__(self, module: GalaxyClassifier) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.module.preprocess(images)
        probs = self.module.log_probs(x, self.module.tta).exp()
        tree = self.module.tree
        if tree is None:
            return probs
        _, outputs = self.module.split_outputs(self.module.net(x).float())
        assert outputs is not None
        return torch.cat([probs, predicted_fractions(outputs, tree, self.module.task["loss"])], 1)


def exportable(module: GalaxyClassifier) -> ExportedClassifier:
    return ExportedClassifier(module).eval()


def example_input(module: GalaxyClassifier, batch: int = 2) -> torch.Tensor:
    spec = module.spec
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, spec.image_size, spec.image_size, spec.channels),
                         dtype=torch.uint8, generator=gen)


def metadata(module: GalaxyClassifier, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What an exported file carries: the input contract, the inference options, the classes."""
    spec = module.spec
    return {
        "format": METADATA_FORMAT,
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "height": spec.image_size,
                  "width": spec.image_size, "channels": spec.channels},
        "input_spec": spec.to_dict(),
        "inference": {**module.inference, "temperature": float(module.temperature)},
        "output": "class probabilities (N, K)" + (
            ", then the predicted vote fraction of every answer of the input spec's decision "
            "tree (N, K + A)" if module.tree is not None else ""),
        "class_names": list(spec.class_names),
        "checkpoint": None if checkpoint is None else str(checkpoint)}


def _dynamic_batch() -> dict[str, dict[int, torch.export.Dim]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


def export_program(module: GalaxyClassifier) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(exportable(module), (example_input(module),),
                                   dynamic_shapes=_dynamic_batch())


def export_pt2(module: GalaxyClassifier, path: Path, meta: dict[str, Any] | None = None) -> Path:
    text = json.dumps(meta or metadata(module), indent=2)
    program = export_program(module)
    with atomic_file(path) as f:
        torch.export.save(program, f, extra_files={METADATA_KEY: text})
    return path


def export_onnx(module: GalaxyClassifier, path: Path, meta: dict[str, Any] | None = None) -> Path:
    try:  # deferred: an optional extra, which the dynamo exporter needs
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx extra: pip install -e \".[onnx]\"") from None
    program = torch.onnx.export(exportable(module), (example_input(module),), None, dynamo=True,
                                input_names=["images"], output_names=["probabilities"],
                                dynamic_shapes=_dynamic_batch(), verbose=False)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta or metadata(module), indent=2)
    with atomic_path(path) as tmp:  # ONNX's writer takes a file name, not a file
        program.save(str(tmp))
    return path


def export(checkpoint: str | Path, out_dir: str | Path, formats: tuple[str, ...] = ("pt2", "onnx"),
           tta: bool | None = None) -> dict[str, Path]:
    """Write the requested formats, each carrying its input spec and inference options, plus the
    same document as ``model.json`` into ``out_dir``."""
    for fmt in formats:
        if fmt == "torchscript":
            raise ConfigError("TorchScript is deprecated in torch 2.13 and no longer written; use "
                              "--format pt2 (torch.export) or onnx")
        if fmt not in FORMATS:
            raise ConfigError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    module = load_classifier(checkpoint).set_inference(tta=tta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata(module, checkpoint)
    writers = {"pt2": export_pt2, "onnx": export_onnx}
    written = {fmt: writers[fmt](module, out_dir / FORMATS[fmt], meta) for fmt in formats}
    write_atomic(out_dir / "model.json", json.dumps(
        {**meta, "files": {k: v.name for k, v in written.items()}}, indent=2))
    return written


# -- using an exported model -------------------------------------------------------------------
def _read_metadata(text: str | bytes | None, path: Path) -> dict[str, Any]:
    if not text:
        raise CheckpointError(f"{path}: carries no galaxy_lightning input spec ({METADATA_KEY}); "
                              "it was not written by this galaxy-export: export the checkpoint "
                              "again with galaxy-export")
    try:
        meta = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path}: its {METADATA_KEY} is not JSON; export the checkpoint "
                              "again with galaxy-export") from None
    if int(meta.get("format", 0)) > METADATA_FORMAT:
        raise CheckpointError(f"{path}: exported by a newer galaxy_lightning (metadata format "
                              f"{meta['format']}, this one reads {METADATA_FORMAT}); upgrade")
    return meta


def _load_pt2(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    extra = {METADATA_KEY: ""}  # torch fills in the named extra files (an empty dict: none)
    try:
        program = torch.export.load(str(path), extra_files=extra).module()
    except (RuntimeError, OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable torch.export program "
                              f"({type(err).__name__}); export it again with galaxy-export") from None
    meta = _read_metadata(extra.get(METADATA_KEY), path)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return program(torch.from_numpy(batch)).numpy()

    return run, meta


def _load_onnx(path: Path, providers: list[str] | None
               ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    try:  # deferred: an optional extra
        import onnxruntime
    except ImportError:
        raise ConfigError("running an ONNX model needs the onnx extra: pip install -e "
                          "\".[onnx]\"") from None
    try:
        session = onnxruntime.InferenceSession(
            str(path), providers=providers or onnxruntime.get_available_providers())
    except Exception as err:  # onnxruntime raises its own exception types, not exported stably
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(err).__name__}); export "
                              "it again with galaxy-export") from None
    meta = _read_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return run, meta


class ExportedModel:
    """An exported model with the input spec it carries: raw uint8 cutouts in, probabilities out.

    Calling it applies the training geometry first (:meth:`InputSpec.conform`: grayscale/alpha
    adapted, the source crop and resize), so a cutout of the size the training data was cut from
    needs nothing done by hand, and a size training did not cover is refused rather than guessed.
    """

    def __init__(self, path: Path, run: Callable[[np.ndarray], np.ndarray],
                 meta: dict[str, Any]) -> None:
        self.path = path
        self._run = run
        self.metadata = meta
        self.spec = InputSpec.from_dict(meta["input_spec"])
        self.inference: dict[str, Any] = dict(meta.get("inference", {}))
        #: the Galaxy Zoo decision tree whose answers the model also predicts (None: classes only)
        self.tree = DecisionTree.from_dict(self.spec.tree) if self.spec.tree is not None else None

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    def _outputs(self, images: np.ndarray | torch.Tensor, allow_resize: bool,
                 batch_size: int) -> np.ndarray:
        """The exported program's whole output: probabilities, then any answers' fractions."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ConfigError(f"images are {images.dtype} of shape {images.shape}; the model takes "
                              "uint8 (N, H, W[, C]); stretch FITS fluxes to uint8 first as "
                              "training did (spec.stretch; galaxy-predict reads FITS files)")
        try:
            ready = self.spec.conform(images, allow_resize)
        except ConfigError as err:
            raise type(err)(f"images of shape {images.shape}: {err}") from None
        width = self.spec.num_classes + (self.tree.num_answers if self.tree is not None else 0)
        if not len(ready):
            return np.zeros((0, width), np.float32)
        return np.concatenate([self._run(np.ascontiguousarray(ready[i:i + batch_size]))
                               for i in range(0, len(ready), max(1, batch_size))])

    def __call__(self, images: np.ndarray | torch.Tensor, allow_resize: bool = False,
                 batch_size: int = 256) -> np.ndarray:
        """Probabilities (N, K) of uint8 images (N, H, W[, C]) of any size the spec covers;
        ``allow_resize`` center-crops and resizes other sizes (as ``galaxy-predict --resize``)."""
        return self._outputs(images, allow_resize, batch_size)[:, :self.spec.num_classes]

    def answer_fractions(self, images: np.ndarray | torch.Tensor, allow_resize: bool = False,
                         batch_size: int = 256) -> np.ndarray:
        """A decision-tree model's predicted vote fraction of every answer (N, A), in the order
        of ``self.tree.answer_columns``."""
        if self.tree is None:
            raise ConfigError(f"{self.path} was not trained with task=decision_tree: it predicts "
                              "classes only")
        return self._outputs(images, allow_resize, batch_size)[:, self.spec.num_classes:]


def load_exported(path: str | Path, providers: list[str] | None = None) -> ExportedModel:
    """An exported ``.pt2`` or ``.onnx`` file with its embedded input spec, ready for raw
    cutouts. ``providers``: onnxruntime execution providers (default: all available)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported model file")
    if path.suffix == ".pt2":
        run, meta = _load_pt2(path)
    elif path.suffix == ".onnx":
        run, meta = _load_onnx(path, providers)
    else:
        raise ConfigError(f"{path}: unknown exported model type {path.suffix!r}; use a .pt2 or "
                          ".onnx file written by galaxy-export")
    return ExportedModel(path, run, meta)


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
