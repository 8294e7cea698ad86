"""The prepared-data format: the one HDF5 layout every data source writes and the DataModule reads.

Layout (format version 1):
- ``images``: uint8 ``(N, H, W, C)``, the pixels exactly as the model will see them before scaling;
- ``labels``: int64 ``(N,)`` in ``0 .. K-1``;
- ``split`` (optional): uint8 ``(N,)`` with 0 = train, 1 = val, 2 = test, when the source fixes the split;
- ``source_index`` (optional): int64 ``(N,)``, the row of each image in the source file;
- attributes ``format`` / ``format_version``, ``class_names`` (JSON list of K names) and
  ``provenance`` (JSON object: where the pixels came from and with which parameters).

Files are written to a temporary name beside the target and renamed into place only when
complete, so a crash never leaves a half-written file that a later run could take for a good one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from galaxy_lightning.errors import GalaxyError

FORMAT = "galaxy_lightning.prepared"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedInfo:
    """What a prepared file holds, read from its header without loading the pixels."""

    path: Path
    num_images: int
    height: int
    width: int
    channels: int
    class_names: list[str]
    provenance: dict[str, Any]
    has_split: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class PreparedData:
    """The arrays of a prepared file, loaded into memory."""

    info: PreparedInfo
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    split: np.ndarray | None  # uint8 (N,) or None


class PreparedWriter:
    """Streams images and labels into a new prepared file; the file appears only on a clean exit.

    Use as a context manager; call :meth:`write` with consecutive row blocks. Leaving the block
    with an exception (or with rows missing) deletes the temporary file and keeps any old file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_images: int,
        image_shape: tuple[int, int, int],
        class_names: list[str],
        provenance: dict[str, Any],
        with_split: bool = False,
        with_source_index: bool = False,
    ) -> None:
        if num_images <= 0:
            raise GalaxyError(f"{path}: refusing to write a prepared file with no images")
        self.path = Path(path)
        self.num_images = num_images
        self.image_shape = tuple(int(s) for s in image_shape)
        self.class_names = [str(c) for c in class_names]
        self.provenance = provenance
        self.with_split = with_split
        self.with_source_index = with_source_index
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file: h5py.File | None = None
        self._rows = 0

    def __enter__(self) -> PreparedWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self._tmp, "w")
        f = self._file
        rows = min(self.num_images, 256)
        f.create_dataset("images", (self.num_images, *self.image_shape), dtype=np.uint8,
                         chunks=(rows, *self.image_shape))
        f.create_dataset("labels", (self.num_images,), dtype=np.int64)
        if self.with_split:
            f.create_dataset("split", (self.num_images,), dtype=np.uint8)
        if self.with_source_index:
            f.create_dataset("source_index", (self.num_images,), dtype=np.int64)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["class_names"] = json.dumps(self.class_names)
        f.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True)
        return self

    def write(self, images: np.ndarray, labels: np.ndarray, split: np.ndarray | None = None,
              source_index: np.ndarray | None = None) -> None:
        """Append a block of rows: images uint8 (n, H, W, C), labels (n,) in 0..K-1."""
        assert self._file is not None, "use PreparedWriter as a context manager"
        n = len(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"expected uint8 images of shape (n, {self.image_shape}), got "
                             f"{images.dtype} {images.shape}")
        if len(labels) != n or (labels.min(initial=0) < 0) or labels.max(initial=0) >= len(self.class_names):
            raise ValueError("labels must match the images and lie in 0..K-1")
        if self._rows + n > self.num_images:
            raise ValueError(f"writing {self._rows + n} rows into a file sized for {self.num_images}")
        end = self._rows + n
        self._file["images"][self._rows:end] = images
        self._file["labels"][self._rows:end] = labels.astype(np.int64)
        if self.with_split:
            if split is None:
                raise ValueError("this writer was opened with_split=True; pass split for every block")
            self._file["split"][self._rows:end] = split.astype(np.uint8)
        if self.with_source_index:
            if source_index is None:
                raise ValueError("this writer was opened with_source_index=True; pass source_index")
            self._file["source_index"][self._rows:end] = source_index.astype(np.int64)
        self._rows = end

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._file is not None
        self._file.close()
        if exc_type is None and self._rows != self.num_images:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: wrote {self._rows} of {self.num_images} rows")
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        os.replace(self._tmp, self.path)


def write_prepared(path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray,
                   class_names: list[str], provenance: dict[str, Any],
                   split: np.ndarray | None = None) -> Path:
    """Write whole in-memory arrays as a prepared file (atomically)."""
    with PreparedWriter(path, len(images), images.shape[1:], class_names, provenance,
                        with_split=split is not None) as writer:
        writer.write(images, labels, split)
    return Path(path)


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise GalaxyError(f"{path}: prepared data file not found; run the data source's preparation "
                          "again (delete the file to force it)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise GalaxyError(f"{path}: not a readable HDF5 file (truncated or corrupt: {err}); "
                          "delete it so that it is prepared again") from None


def read_info(path: str | os.PathLike[str]) -> PreparedInfo:
    """Read and validate the header of a prepared file (shapes, dtypes, attributes)."""
    path = Path(path)
    with _open(path) as f:
        return _info(path, f)


def _info(path: Path, f: h5py.File) -> PreparedInfo:
    fix = "delete it so that it is prepared again"
    if f.attrs.get("format") != FORMAT:
        raise GalaxyError(f"{path}: not a galaxy_lightning prepared file (attribute 'format' is "
                          f"{f.attrs.get('format')!r}); {fix}")
    if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
        raise GalaxyError(f"{path}: prepared format version {f.attrs.get('format_version')} is not "
                          f"{FORMAT_VERSION}; {fix}")
    for key in ("images", "labels"):
        if key not in f:
            raise GalaxyError(f"{path}: key '{key}' is missing; {fix}")
    images, labels = f["images"], f["labels"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise GalaxyError(f"{path}: 'images' must be uint8 (N, H, W, C), found {images.dtype} "
                          f"{images.shape}; {fix}")
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise GalaxyError(f"{path}: 'labels' must be int64 ({images.shape[0]},), found "
                          f"{labels.dtype} {labels.shape}; {fix}")
    try:
        class_names = json.loads(f.attrs["class_names"])
        provenance = json.loads(f.attrs.get("provenance", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise GalaxyError(f"{path}: attributes 'class_names'/'provenance' are missing or not JSON; "
                          f"{fix}") from None
    has_split = "split" in f
    if has_split and f["split"].shape != (images.shape[0],):
        raise GalaxyError(f"{path}: 'split' must have shape ({images.shape[0]},); {fix}")
    n, h, w, c = images.shape
    return PreparedInfo(path, n, h, w, c, [str(x) for x in class_names], provenance, has_split)


def read_prepared(path: str | os.PathLike[str]) -> PreparedData:
    """Load a prepared file into memory, checking that its labels fit its class names."""
    path = Path(path)
    with _open(path) as f:
        info = _info(path, f)
        try:
            images = f["images"][...]
            labels = f["labels"][...]
            split = f["split"][...] if info.has_split else None
        except OSError as err:
            raise GalaxyError(f"{path}: reading the arrays failed (truncated or corrupt: {err}); "
                              "delete it so that it is prepared again") from None
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise GalaxyError(f"{path}: labels span {labels.min()}..{labels.max()} but the file names "
                          f"{info.num_classes} classes; delete it so that it is prepared again")
    if split is not None and len(split) and split.max() > 2:
        raise GalaxyError(f"{path}: 'split' values must be 0 (train), 1 (val) or 2 (test)")
    return PreparedData(info, images, labels, split)


def provenance_matches(path: str | os.PathLike[str], expected: dict[str, Any]) -> bool:
    """True when ``path`` is a valid prepared file whose provenance has these entries.

    ``expected`` holds what determines the contents (source identity, parameters); the file's
    provenance may add results (counts, duplicates dropped) that are not compared.
    """
    try:
        info = read_info(path)
    except GalaxyError:
        return False
    # Round-trip through JSON so that tuples/lists and int/float spellings compare equal.
    expected = json.loads(json.dumps(expected, sort_keys=True))
    return all(info.provenance.get(key) == value for key, value in expected.items())
