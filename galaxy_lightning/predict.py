"""Classify new images with a checkpoint: ``galaxy-predict CKPT INPUT... --out predictions.csv``.

Inputs are PNG/JPEG files, folders of them, or HDF5 files (``--h5-key``, default ``images``).
The checkpoint's input spec says how training saw its images, and prediction repeats it
(:meth:`~galaxy_lightning.input_spec.InputSpec.conform`, then the model's own preprocessing):
the source crop (e.g. 256 -> 96 for Galaxy10 DECaLS) and resize, the channel count (RGB or
grayscale), the pixel scale, the class names. An image of another size is refused with a
message unless ``--resize`` asks to center-crop it to a square and resize it. Unreadable files
are reported and skipped. The CSV has one row per image: file, predicted class, and the
probability of every class.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.errors import ConfigError, DataError, cli_boundary
from galaxy_lightning.input_spec import SizeMismatch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def iter_inputs(inputs: list[str], channels: int, h5_key: str) -> Iterator[tuple[str, np.ndarray | Exception]]:
    """(name, image or the error that made it unreadable) for every input image."""
    import h5py

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                yield str(path), DataError("folder has no PNG or JPEG files")
            for f in files:
                try:
                    yield str(f), _read_image(f, channels)
                except Exception as err:  # noqa: BLE001 - PIL raises many types
                    yield str(f), err
        elif path.suffix.lower() in (".h5", ".hdf5"):
            try:
                with h5py.File(path, "r") as f:
                    if h5_key not in f:
                        raise DataError(f"key '{h5_key}' not found (keys: {', '.join(f.keys())}); "
                                        "set --h5-key")
                    data = f[h5_key]
                    if data.dtype != np.uint8:
                        raise DataError(f"'{h5_key}' is {data.dtype}; prediction takes uint8 images")
                    for start in range(0, len(data), 1024):
                        block = data[start:start + 1024]
                        for i, img in enumerate(block):
                            yield f"{path}[{start + i}]", img
            except Exception as err:  # noqa: BLE001
                yield str(path), err
        else:
            try:
                yield str(path), _read_image(path, channels)
            except Exception as err:  # noqa: BLE001
                yield str(path), err


@torch.no_grad()
def predict(checkpoint: str | Path, inputs: list[str], out_csv: str | Path, batch_size: int = 256,
            h5_key: str = "images", allow_resize: bool = False, progress: bool = True,
            tta: bool | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Write predictions to ``out_csv``; return (images predicted, [(file, reason skipped)]).
    ``tta`` (mean softmax over the 8 symmetric views) defaults to the checkpoint's setting."""
    from tqdm.auto import tqdm

    module = load_classifier(checkpoint).set_inference(tta=tta)
    spec = module.spec
    names = list(spec.class_names)
    skipped: list[tuple[str, str]] = []
    done = 0
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp")
    with open(tmp, "w", newline="") as f, tqdm(desc="predicting", unit="img", disable=not progress) as bar:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted_class", "predicted_index", *[f"p_{n}" for n in names]])
        pending: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            nonlocal done
            if not pending:
                return
            probs = module.probabilities(torch.from_numpy(np.stack([img for _, img in pending])))
            for (name, _), p in zip(pending, probs.tolist()):
                k = int(np.argmax(p))
                writer.writerow([name, names[k], k, *[f"{x:.6g}" for x in p]])
            done += len(pending)
            bar.update(len(pending))
            pending.clear()

        for name, image in iter_inputs(inputs, spec.channels, h5_key):
            if isinstance(image, Exception):
                skipped.append((name, str(image).splitlines()[0] if str(image) else type(image).__name__))
                continue
            try:
                pending.append((name, spec.conform(image[None], allow_resize)[0]))
            except SizeMismatch as err:
                skipped.append((name, f"{err} (--resize)"))
                continue
            except ConfigError as err:
                skipped.append((name, str(err)))
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
    tmp.replace(out_csv)
    return done, skipped


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-predict", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by galaxy-train")
    parser.add_argument("inputs", nargs="+", help="image files, folders of them, or HDF5 files")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (predictions.csv)")
    parser.add_argument("--h5-key", default="images", help="dataset of uint8 images in HDF5 inputs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--resize", action="store_true",
                        help="center-crop and resize images whose size does not match")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the softmax over the 8 rotations/flips of each image "
                             "(default: as the run was configured)")
    args = parser.parse_args(argv)
    done, skipped = predict(args.checkpoint, args.inputs, args.out, args.batch_size,
                            args.h5_key, args.resize, tta=args.tta)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"{done} images classified -> {args.out}" + (f"; {len(skipped)} skipped" if skipped else ""))
    if done == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
