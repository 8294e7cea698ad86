"""Classify new images with a checkpoint: ``galaxy-predict CKPT [INPUT ...] [--catalog CAT] --out CSV``.

Inputs are image files (PNG/JPEG, FITS), folders of them, HDF5 files of uint8 images
(``--h5-key``, default ``images``; ``id``, ``ra`` and ``dec`` arrays beside them are carried
into the output), or a catalog (``--catalog``: CSV, Parquet, FITS/ECSV table) whose image
columns name the files. For a checkpoint trained with ``data=catalog`` the catalog options
default to the training ones, so ``--catalog new.csv --image-root cutouts/`` is enough.

The checkpoint's input spec says how training saw its images, and prediction repeats it: the
FITS HDU, NaN fill and stretch, the source crop (e.g. 256 -> 96 for Galaxy10 DECaLS) and resize,
the channel count, the pixel scale, the class names, and the run's inference options (test-time
augmentation, temperature). An image of another size is refused unless ``--resize`` asks to
center-crop and resize it; FITS files with other bands than the model's are refused. Unreadable
or refused files are reported and skipped. The CSV has one row per image: the
object's id, ra and dec when the input has them, the file, the predicted class and the
probability of every class, so it joins back onto the user's catalog.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from galaxy_lightning import console
from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.data.catalog import read_table, resolve_image_paths, table_column
from galaxy_lightning.data.images import FITS_SUFFIXES, RASTER_SUFFIXES, ImageReader, read_images
from galaxy_lightning.data.selection import as_text
from galaxy_lightning.errors import ConfigError, DataError, cli_boundary
from galaxy_lightning.files import atomic_file
from galaxy_lightning.input_spec import InputSpec, SizeMismatch
from galaxy_lightning.module import GalaxyClassifier

IMAGE_SUFFIXES = set(RASTER_SUFFIXES) | set(FITS_SUFFIXES)
IDENTITY = ("id", "ra", "dec")


@dataclass
class CatalogInput:
    """Where a catalog's images are and which columns name the objects."""

    catalog: str
    image_root: list[str] = field(default_factory=list)
    image_columns: list[str] | None = None
    match: str | None = None
    id_column: str | None = None
    ra_column: str | None = None
    dec_column: str | None = None

    def with_training_defaults(self, module: GalaxyClassifier) -> CatalogInput:
        """Options left unset take the values the checkpoint was trained with (data=catalog)."""
        source = training_catalog(module)
        out = CatalogInput(self.catalog, self.image_root)
        for key in ("image_columns", "match", "id_column", "ra_column", "dec_column"):
            setattr(out, key, getattr(self, key) or source.get(key))
        out.match = out.match or "path"
        if not out.image_columns:
            raise ConfigError("--image-columns is needed: the checkpoint was not trained on a "
                              "catalog, so it does not know which column names the files")
        return out


def training_catalog(module: GalaxyClassifier) -> dict[str, Any]:
    """The catalog source config the checkpoint was trained with ({} for other data)."""
    source = (module.hparams.get("data") or {}).get("source") or {}
    return dict(source) if str(source.get("_target_", "")).endswith("CatalogSource") else {}


def prediction_spec(module: GalaxyClassifier) -> InputSpec:
    """The checkpoint's input spec; for FITS models whose spec predates recording the HDU and the
    NaN policy, those of the training catalog config, so that new files are read as training
    read its files."""
    spec = module.spec
    if spec.fits is None and spec.stretch is not None:
        source = training_catalog(module)
        if source:
            spec = spec.replace(fits={"hdu": source.get("fits_hdu", 0),
                                      "nan": source.get("nan", "median")})
    return spec


def _is_image(path: Path) -> bool:
    return str(path).lower().endswith(tuple(IMAGE_SUFFIXES))


def file_jobs(inputs: list[str]) -> tuple[list[tuple[str, tuple[Path, ...]]], list[tuple[str, str]]]:
    """(name, files) of every image file given or found in a folder, and problems with inputs."""
    jobs, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p))
            if not files:
                problems.append((str(path), "folder has no PNG, JPEG or FITS files"))
            jobs += [(str(f), (f,)) for f in files]
        elif path.suffix.lower() not in (".h5", ".hdf5"):
            jobs.append((str(path), (path,)))
    return jobs, problems


def h5_batches(path: Path, key: str, block: int = 1024
               ) -> Iterator[tuple[list[str], np.ndarray, dict[str, np.ndarray]]]:
    """Blocks of (names, uint8 images, identity columns) of an HDF5 array of images."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        if key not in f:
            raise DataError(f"{path}: key '{key}' not found (keys: {', '.join(f.keys())}); set "
                            "--h5-key")
        data = f[key]
        if data.dtype != np.uint8:
            raise DataError(f"{path}: '{key}' is {data.dtype}; prediction takes uint8 images")
        identity = {k: f[k] for k in IDENTITY if k in f and f[k].shape[:1] == data.shape[:1]}
        for start in range(0, len(data), block):
            stop = min(start + block, len(data))
            columns = {k: np.asarray(v[start:stop]) for k, v in identity.items()}
            if "id" in columns:
                columns["id"] = as_text(columns["id"])
            yield [f"{path}[{i}]" for i in range(start, stop)], data[start:stop], columns


class PredictionWriter:
    """The CSV: identity columns (when any input has them), file, prediction, probabilities;
    for a decision-tree model (``module.tree``), every answer's predicted vote fraction
    ``<question>_<answer>_fraction`` and its 90% interval (``_low``, ``_high``), the columns of
    a Galaxy Zoo catalog."""

    def __init__(self, f: Any, module: GalaxyClassifier, names: list[str], identity: bool) -> None:
        self.writer = csv.writer(f)
        self.module = module
        self.identity = identity
        self.names = names
        tree = module.tree
        answers = [f"{c}_fraction{end}" for c in tree.answer_columns
                   for end in ("", "_low", "_high")] if tree is not None else []
        self.writer.writerow([*(IDENTITY if identity else ()), "file", "predicted_class",
                              "predicted_index", *[f"p_{n}" for n in names], *answers])

    def rows(self, files: list[str], images: torch.Tensor, columns: dict[str, np.ndarray]) -> None:
        """Predict ``images`` (uint8, in the training geometry) and write one row each."""
        probs = self.module.probabilities(images).tolist()
        tree: list[list[float]] = [[] for _ in files]
        if self.module.tree is not None:
            fractions, low, high = self.module.answer_fractions(images)
            tree = torch.stack([fractions, low, high], dim=2).flatten(1).tolist()
        for i, (name, p) in enumerate(zip(files, probs)):
            k = int(np.argmax(p))
            ident = [columns[c][i] if c in columns else "" for c in IDENTITY] if self.identity else []
            self.writer.writerow([*ident, name, self.names[k], k, *[f"{x:.6g}" for x in p],
                                  *[f"{x:.4f}" for x in tree[i]]])


@torch.no_grad()
def predict(checkpoint: str | Path, inputs: list[str], out_csv: str | Path, batch_size: int = 256,
            h5_key: str = "images", allow_resize: bool = False, progress: bool = True,
            tta: bool | None = None, calibrated: bool | None = None,
            catalog: CatalogInput | None = None, workers: int = 0
            ) -> tuple[int, list[tuple[str, str]]]:
    """Write predictions to ``out_csv``; return (images predicted, [(file, reason skipped)]).
    ``tta`` and ``calibrated`` default to the run's own inference options."""
    module = load_classifier(checkpoint).set_inference(tta=tta, calibrated=calibrated)
    spec = prediction_spec(module)
    reader = ImageReader.for_spec(spec, allow_resize)
    jobs, skipped = file_jobs(inputs)
    job_columns: dict[str, np.ndarray] = {}
    if catalog is not None:
        catalog = catalog.with_training_defaults(module)
        path = Path(catalog.catalog)
        table = read_table(path)
        rows = np.arange(len(table))
        roots = [Path(r) for r in catalog.image_root] or [path.parent]
        paths, _ = resolve_image_paths(table, path, roots, catalog.image_columns or [],
                                       catalog.match or "path", rows)
        for key, column in zip(IDENTITY, (catalog.id_column, catalog.ra_column, catalog.dec_column)):
            if column:
                values = table_column(table, column, f"--{key}-column", path)
                job_columns[key] = as_text(values) if key == "id" else values
        first = len(jobs)
        for i, files in enumerate(paths):
            name = str(files[0]) if files else f"{path.name} row {i}"
            if files is None:
                skipped.append((name, "image file not found"))
            jobs.append((name, files or ()))
        job_columns = {k: np.concatenate([np.full(first, "" if k == "id" else np.nan, dtype=object),
                                          v.astype(object)]) for k, v in job_columns.items()}
    h5_inputs = [Path(i) for i in inputs if Path(i).suffix.lower() in (".h5", ".hdf5")]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    with atomic_file(out_csv, "w", newline="") as f, \
            console.progress(desc="predicting", unit="img", enabled=progress) as bar:
        writer = PredictionWriter(f, module, list(spec.class_names),
                                  identity=bool(job_columns) or bool(h5_inputs))
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            nonlocal done
            if pending:
                index = [i for i, _ in pending]
                writer.rows([jobs[i][0] for i in index],
                            torch.from_numpy(np.stack([img for _, img in pending])),
                            {k: v[index] for k, v in job_columns.items()})
                done += len(pending)
                bar.update(len(pending))
                pending.clear()

        readable = [(i, files) for i, (_, files) in enumerate(jobs) if files]
        for index, result in read_images(reader, readable, workers):
            if isinstance(result, Exception):
                reason = str(result).removeprefix(f"{jobs[index][0]}: ")
                skipped.append((jobs[index][0], f"{reason} (--resize)"
                                if isinstance(result, SizeMismatch) else reason))
                continue
            pending.append((index, result))
            if len(pending) >= batch_size:
                flush()
        flush()
        for h5 in h5_inputs:
            for names, images, columns in h5_batches(h5, h5_key):
                try:
                    images = spec.conform(images, allow_resize)
                except ConfigError as err:
                    skipped.append((str(h5), str(err)))
                    break
                writer.rows(names, torch.from_numpy(np.ascontiguousarray(images)), columns)
                done += len(names)
                bar.update(len(names))
    return done, skipped


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-predict", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by galaxy-train")
    parser.add_argument("inputs", nargs="*", help="image files (PNG, JPEG, FITS), folders of them, "
                                                  "or HDF5 files")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (predictions.csv)")
    parser.add_argument("--h5-key", default="images", help="dataset of uint8 images in HDF5 inputs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="processes reading image files")
    parser.add_argument("--resize", action="store_true",
                        help="center-crop and resize images whose size does not match")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the softmax over the 8 rotations/flips of each image "
                             "(default: as the run was configured)")
    parser.add_argument("--calibrated", action=argparse.BooleanOptionalAction, default=None,
                        help="divide the logits by the fitted temperature (default: as the run)")
    group = parser.add_argument_group("catalog input (defaults: the training catalog's columns)")
    group.add_argument("--catalog", help="a CSV, Parquet, FITS or ECSV table of objects")
    group.add_argument("--image-root", nargs="+", default=[],
                       help="folder(s) the image paths are relative to (default: the catalog's)")
    group.add_argument("--image-columns", nargs="+", help="column(s) or patterns naming the files")
    group.add_argument("--match", choices=["path", "name"], help="resolve files by relative path "
                                                                 "or by file name below the root")
    group.add_argument("--id-column")
    group.add_argument("--ra-column")
    group.add_argument("--dec-column")
    args = parser.parse_args(argv)
    if not args.inputs and not args.catalog:
        parser.error("give image files, folders, HDF5 files or --catalog")
    catalog = CatalogInput(args.catalog, args.image_root, args.image_columns, args.match,
                           args.id_column, args.ra_column, args.dec_column) if args.catalog else None
    done, skipped = predict(args.checkpoint, args.inputs, args.out, args.batch_size, args.h5_key,
                            args.resize, tta=args.tta, calibrated=args.calibrated, catalog=catalog,
                            workers=args.workers)
    for name, reason in skipped[:20]:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more skipped", file=sys.stderr)
    print(f"{done} images classified -> {args.out}" + (f"; {len(skipped)} skipped" if skipped else ""))
    if done == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
