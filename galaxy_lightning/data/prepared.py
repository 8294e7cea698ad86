"""The prepared-data format: the one HDF5 layout every data source writes and the DataModule reads.

Layout (format version 2):
- ``images``: uint8 ``(N, H, W, C)``, the pixels exactly as the model will see them before scaling;
- ``labels``: int64 ``(N,)`` in ``0 .. K-1``;
- optional per-row columns (:data:`COLUMNS`): ``split`` (0 = train, 1 = val, 2 = test, when the
  source fixes the split), ``source_index`` (the row of each image in the source), ``id``
  (the object's name in the user's catalog), ``ra`` / ``dec`` (degrees), ``targets`` (float32
  ``(N, K)`` soft targets, e.g. volunteer vote fractions), ``votes`` (float32 ``(N, A)``: the
  volunteers' vote counts for every answer of the input spec's decision tree);
- attributes ``format`` / ``format_version``, ``input_spec`` (JSON of
  :class:`~galaxy_lightning.input_spec.InputSpec`: classes, geometry, scaling, stretch),
  ``class_names`` (JSON, for readers that only want the names) and ``provenance`` (JSON: where
  the pixels came from and with which parameters).

Version 1 files (no ``input_spec``) are still read: their spec is derived from the shapes, the
class names and the provenance.

Files are written to a temporary name beside the target and renamed into place only when
complete, so a crash never leaves a half-written file that a later run could take for a good one.
Every source makes its file through :func:`prepare_once`: reused while the provenance matches,
made by one process at a time otherwise. A source that reads its rows in a fixed order (a
catalog) writes resumably: its temporary file ``.<name>.partial`` records how far it got after
every block, and a preparation killed at row 250,000 goes on from there.

A file may also be *combined* from part files (:func:`combine_parts`: the parts of one
preparation split over several processes or cluster jobs): its ``images`` is then an HDF5
virtual dataset over the parts' images (the pixels are not copied), and the part files must stay
beside it (checked whenever the file is opened).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
from filelock import FileLock

from galaxy_lightning.errors import ConfigError, DataError
from galaxy_lightning.files import temporary_path
from galaxy_lightning.input_spec import InputSpec

FORMAT = "galaxy_lightning.prepared"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLIT_NAMES = ("train", "val", "test")
#: Optional per-row columns: name -> dtype (``targets`` has a second axis of length K).
COLUMNS: dict[str, Any] = {
    "split": np.uint8, "source_index": np.int64, "id": h5py.string_dtype(), "ra": np.float64,
    "dec": np.float64, "targets": np.float32, "votes": np.float32,
}


def column_width(name: str, spec: InputSpec) -> tuple[int, ...]:
    """The shape of one row of a column: ``targets`` one value per class, ``votes`` one vote
    count per answer of the spec's decision tree, the others a scalar."""
    if name == "targets":
        return (spec.num_classes,)
    if name == "votes":
        if spec.tree is None:
            raise ValueError("a 'votes' column needs an input spec with a decision tree")
        return (sum(len(q["answers"]) for q in spec.tree["questions"]),)
    return ()


@dataclass(frozen=True)
class PreparedInfo:
    """What a prepared file holds, read from its header without loading the pixels."""

    path: Path
    num_images: int
    height: int
    width: int
    channels: int
    spec: InputSpec
    provenance: dict[str, Any]
    columns: tuple[str, ...] = ()

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def has_split(self) -> bool:
        return "split" in self.columns


@dataclass(frozen=True)
class PreparedData:
    """The arrays of a prepared file, loaded into memory."""

    info: PreparedInfo
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def split(self) -> np.ndarray | None:
        return self.columns.get("split")


class PreparedWriter:
    """Streams images and labels into a new prepared file; the file appears only on a clean exit.

    Use as a context manager; call :meth:`write` with consecutive row blocks. Leaving the block
    with an exception (or with rows missing) deletes the temporary file and keeps any old file.
    ``columns`` names the optional per-row columns (:data:`COLUMNS`) every block will carry.
    ``num_images`` is exact, or with ``at_most`` an upper bound (a source that skips unreadable
    images): the file then holds the rows written.

    ``resume`` (a key naming exactly what is written: provenance, rows, part) makes the writer
    resumable: the temporary file is ``.<name>.partial``, :meth:`checkpoint` records the rows
    written and the caller's ``state`` in it (flushed), and it survives a kill or Ctrl-C. A later
    writer with the same key opens it again with :attr:`rows` and :attr:`state` as recorded, so
    the caller continues from there; a partial file of another key is discarded.
    """

    def __init__(self, path: str | os.PathLike[str], num_images: int, spec: InputSpec,
                 provenance: dict[str, Any], columns: tuple[str, ...] = (),
                 at_most: bool = False, resume: str | None = None) -> None:
        if num_images <= 0:
            raise DataError(f"{path}: refusing to write a prepared file with no images")
        unknown = sorted(set(columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown prepared columns {unknown}; known: {sorted(COLUMNS)}")
        self.path = Path(path)
        self.num_images = num_images
        self.spec = spec
        self.image_shape = (spec.image_size, spec.image_size, spec.channels)
        self.provenance = provenance
        self.columns = tuple(columns)
        self.at_most = at_most
        self.resume = resume
        # renamed into place on success only
        self._tmp = partial_path(self.path) if resume is not None else temporary_path(self.path)
        # (HDF5's own file locking is off for the file being written: the target's file_lock
        # already admits one writer, and reader processes forked while it is open, whose parent
        # may be killed, must not keep a resumed writer out)
        self._file: h5py.File | None = None
        self._rows = 0
        #: what the caller recorded with the last :meth:`checkpoint` of a resumed partial file
        self.state: dict[str, Any] = {}

    @property
    def rows(self) -> int:
        """Rows written so far (on entry: those a resumed partial file already holds)."""
        return self._rows

    def __enter__(self) -> PreparedWriter:
        # Temporary files of this target left by a killed writer (a live one holds the target's
        # file_lock, which the caller holds now) are garbage.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._reopen():
                return self
            self._tmp.unlink(missing_ok=True)
            self._file = h5py.File(self._tmp, "w", locking=False)
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write {self.path} ({err.strerror or err}); choose a writable "
                            "data directory (paths.data_dir) with free space") from None
        if self.resume is not None:
            self._file.attrs["resume_key"] = self.resume
            self._file.attrs["resume_rows"] = 0
        f = self._file
        rows = min(self.num_images, 256)
        grow = {"maxshape": (None, *self.image_shape)} if self.at_most else {}
        f.create_dataset("images", (self.num_images, *self.image_shape), dtype=np.uint8,
                         chunks=(rows, *self.image_shape), **grow)
        f.create_dataset("labels", (self.num_images,), dtype=np.int64,
                         **({"maxshape": (None,)} if self.at_most else {}))
        for name in self.columns:
            tail = column_width(name, self.spec)
            f.create_dataset(name, (self.num_images, *tail), dtype=COLUMNS[name],
                             **({"maxshape": (None, *tail)} if self.at_most else {}))
        return self

    def _reopen(self) -> bool:
        """Open the partial file of a killed writer of the same key; False if there is none."""
        if self.resume is None or not self._tmp.is_file():
            return False
        try:
            f = h5py.File(self._tmp, "r+", locking=False)
        except OSError:  # killed in the middle of writing its metadata: start again
            return False
        try:
            if f.attrs.get("resume_key") != self.resume or "images" not in f or \
                    f["images"].shape[1:] != self.image_shape:
                f.close()
                return False
            self._rows = int(f.attrs["resume_rows"])
            self.state = json.loads(f.attrs.get("resume_state", "{}"))
        except (OSError, KeyError, ValueError):
            f.close()
            return False
        self._file = f
        return True

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Record the rows written and the caller's ``state`` (JSON-able) in the partial file and
        flush it, so that a kill after this point resumes here (resumable writers only)."""
        assert self._file is not None and self.resume is not None
        self._file.attrs["resume_rows"] = self._rows
        self._file.attrs["resume_state"] = json.dumps(state)
        try:
            self._file.flush()
        except OSError as err:
            raise DataError(f"cannot write {self.path} ({err.strerror or err}); free space in the "
                            "data directory (paths.data_dir) or choose another") from None

    def written_labels(self) -> np.ndarray:
        """The labels of the rows written so far (including those of a resumed partial file)."""
        assert self._file is not None
        return self._file["labels"][:self._rows]

    def _write_attributes(self) -> None:
        """The header, written last: a source may add results (counts) to the provenance while
        it writes."""
        assert self._file is not None
        f = self._file
        for key in ("resume_key", "resume_rows", "resume_state"):
            if key in f.attrs:
                del f.attrs[key]
        _write_header(f, self.spec, self.provenance)

    def write(self, images: np.ndarray, labels: np.ndarray, **columns: np.ndarray | None) -> None:
        """Append a block of rows: images uint8 (n, H, W, C), labels (n,) in 0..K-1, and one
        array of n rows for each column the writer was opened with."""
        assert self._file is not None, "use PreparedWriter as a context manager"
        n = len(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"expected uint8 images of shape (n, {self.image_shape}), got "
                             f"{images.dtype} {images.shape}")
        if len(labels) != n or (labels.min(initial=0) < 0) or \
                labels.max(initial=0) >= self.spec.num_classes:
            raise ValueError("labels must match the images and lie in 0..K-1")
        if self._rows + n > self.num_images:
            raise ValueError(f"writing {self._rows + n} rows into a file sized for {self.num_images}")
        if set(k for k, v in columns.items() if v is not None) != set(self.columns):
            raise ValueError(f"this writer was opened with columns {self.columns}; pass exactly "
                             f"those for every block (got {sorted(columns)})")
        end = self._rows + n
        try:
            self._write_rows(images, labels, columns, end)
        except OSError as err:  # a full disk, or the folder went away
            raise DataError(f"cannot write {self.path} ({err.strerror or err}); free space in "
                            "the data directory (paths.data_dir) or choose another") from None
        self._rows = end

    def _write_rows(self, images: np.ndarray, labels: np.ndarray,
                    columns: dict[str, np.ndarray | None], end: int) -> None:
        assert self._file is not None
        n = len(images)
        self._file["images"][self._rows:end] = images
        self._file["labels"][self._rows:end] = labels.astype(np.int64)
        for name in self.columns:
            values = np.asarray(columns[name])
            if len(values) != n:
                raise ValueError(f"column '{name}' has {len(values)} rows for {n} images")
            if name == "id":
                values = values.astype(str).astype(object)
            self._file[name][self._rows:end] = values

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._file is not None
        if self.resume is not None and exc_type is not None and \
                issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: kept, the same command goes on from the last checkpoint (as after a kill).
            # A refusal (bad input) removes it: nothing half-written stays behind bad input.
            self._file.close()
            return
        if exc_type is None and self.at_most and 0 < self._rows < self.num_images:
            for name in ("images", "labels", *self.columns):
                self._file[name].resize(self._rows, axis=0)
            self.num_images = self._rows
        try:
            if exc_type is None:
                self._write_attributes()
            self._file.close()
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write {self.path} ({err.strerror or err}); free space in the "
                            "data directory (paths.data_dir) or choose another") from None
        if exc_type is None and self.at_most and self._rows == 0:
            self._tmp.unlink(missing_ok=True)
            raise DataError(f"{self.path}: none of its {self.num_images} images could be read; "
                            "fix the files (the warnings name them)" + (
                                ", or prepare in fewer parts" if ".part-" in self.path.name
                                else ""))
        if exc_type is None and self._rows != self.num_images:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: wrote {self._rows} of {self.num_images} rows")
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        try:
            os.replace(self._tmp, self.path)
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            raise DataError(f"cannot write {self.path} ({err.strerror or err}); choose a writable "
                            "data directory (paths.data_dir)") from None


def _write_header(f: h5py.File, spec: InputSpec, provenance: dict[str, Any]) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["input_spec"] = json.dumps(spec.to_dict(), sort_keys=True)
    f.attrs["class_names"] = json.dumps(list(spec.class_names))
    f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)


def partial_path(path: Path) -> Path:
    """Where a resumable writer keeps the rows of ``path`` written so far."""
    return path.with_name(f".{path.name}.partial")


def part_path(path: Path, part: int | str, parts: int | str, provenance: dict[str, Any]) -> Path:
    """The file of part ``part`` (0-based) of ``parts`` of the prepared file ``path`` made with
    this ``provenance``: ``<name>.<hash>.part-00003-of-00016.h5`` beside it. The hash of the
    provenance keeps the parts of other settings (another crop, seed, catalog) apart, so that a
    combined file never reads pixels that another preparation put in its place. (``part`` and
    ``parts`` may be ``*``: the pattern of every part.)"""
    stem = path.name[:-3] if path.name.endswith(".h5") else path.name
    tag = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:10]
    number = (lambda v, w: v if isinstance(v, str) else f"{v:0{w}d}")
    return path.with_name(f"{stem}.{tag}.part-{number(part, 5)}-of-{number(parts, 5)}.h5")


def combine_parts(target: Path, parts: list[Path], provenance: dict[str, Any]) -> None:
    """Write ``target`` as the rows of ``parts`` (prepared files of one spec, in order) one after
    another, with this ``provenance``: its ``images`` is a virtual dataset over the parts' images
    (named relative to ``target``'s folder, so the folder can move as a whole), the small per-row
    columns are copied. Readers see the same arrays as a file written in one go."""
    infos = [read_info(p) for p in parts]
    first = infos[0]
    for info in infos[1:]:
        if info.spec != first.spec or info.columns != first.columns:
            raise DataError(f"{info.path}: its input spec or columns differ from those of "
                            f"{first.path.name}; delete the part files and prepare them again")
    n = sum(info.num_images for info in infos)
    shape = (first.height, first.width, first.channels)
    tmp = temporary_path(target)
    try:
        with h5py.File(tmp, "w") as f:
            layout = h5py.VirtualLayout((n, *shape), np.uint8)
            start = 0
            for info in infos:
                name = os.path.relpath(info.path, target.parent)
                layout[start:start + info.num_images] = h5py.VirtualSource(
                    name, "images", shape=(info.num_images, *shape))
                start += info.num_images
            f.create_virtual_dataset("images", layout)
            for name in ("labels", *first.columns):
                values = []
                for info in infos:
                    with h5py.File(info.path, "r") as part:
                        values.append(part[name][...])
                f.create_dataset(name, data=np.concatenate(values),
                                 dtype=np.int64 if name == "labels" else COLUMNS[name])
            _write_header(f, first.spec, provenance)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {target} ({err.strerror or err}); choose a writable data "
                        "directory (paths.data_dir) with free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of ``path`` (a ``.<name>.lock`` file beside it) while making that file.

    Processes started together (the ranks of a DDP job under a cluster's launcher, parallel
    sweep jobs) would otherwise simulate, download or convert the same file at once: one makes
    it while the others wait, then they find it made and reuse it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path.with_name(f".{path.name}.lock"))
        lock.acquire()
    except OSError as err:
        raise DataError(f"cannot write in {path.parent} ({err.strerror or err}); choose a writable "
                        "data directory (paths.data_dir)") from None
    try:
        yield
    finally:
        lock.release()


def announce(message: str, progress: bool = True, level: int = logging.INFO) -> None:
    """Tell the user what a data source is doing: through logging when the application set it up
    (Hydra does, for every run), else on stdout when progress output is wanted."""
    logging.getLogger("galaxy_lightning.data").log(level, message)
    if progress and not logging.getLogger().handlers:
        print(message, flush=True)


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: prepared data file not found; run the data source's preparation "
                        "again (delete the file to force it)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupt: {err}); "
                        "delete it so that it is prepared again") from None


def read_info(path: str | os.PathLike[str]) -> PreparedInfo:
    """Read and validate the header of a prepared file (shapes, dtypes, attributes)."""
    path = Path(path)
    with _open(path) as f:
        return _info(path, f)


def _spec_of_version_1(class_names: list[str], shape: tuple[int, ...],
                       provenance: dict[str, Any]) -> InputSpec:
    """The input spec a format-1 file implies: its shape, its names, its source's crop/resize."""
    params = provenance.get("params", {}) if isinstance(provenance.get("params"), dict) else {}
    _, h, _, c = shape
    crop, resize = params.get("crop"), params.get("resize")
    if resize is None and crop is not None and crop != h:
        crop = None
    return InputSpec(class_names=tuple(class_names), channels=c, image_size=h, crop=crop,
                     resize=resize)


def _info(path: Path, f: h5py.File) -> PreparedInfo:
    fix = "delete it so that it is prepared again"
    if f.attrs.get("format") != FORMAT:
        raise DataError(f"{path}: not a galaxy_lightning prepared file (attribute 'format' is "
                        f"{f.attrs.get('format')!r}); {fix}")
    version = int(f.attrs.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise DataError(f"{path}: prepared format version {version} is not one of "
                        f"{READABLE_VERSIONS}; {fix}")
    for key in ("images", "labels"):
        if key not in f:
            raise DataError(f"{path}: key '{key}' is missing; {fix}")
    images, labels = f["images"], f["labels"]
    if images.is_virtual:  # combined from part files (combine_parts): they must be there
        for source in images.virtual_sources():
            part = Path(source.file_name)
            part = part if part.is_absolute() else path.parent / part
            if not part.is_file():
                raise DataError(f"{path}: its images are in the part file {part}, which is "
                                "missing; keep the part files beside it, or delete "
                                f"{path.name} so that it is prepared again")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: 'images' must be uint8 (N, H, W, C), found {images.dtype} "
                        f"{images.shape}; {fix}")
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise DataError(f"{path}: 'labels' must be int64 ({images.shape[0]},), found "
                        f"{labels.dtype} {labels.shape}; {fix}")
    try:
        provenance = json.loads(f.attrs.get("provenance", "{}"))
        if version == 1:
            spec = _spec_of_version_1(json.loads(f.attrs["class_names"]), images.shape, provenance)
        else:
            spec = InputSpec.from_dict(json.loads(f.attrs["input_spec"]))
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError) as err:
        raise DataError(f"{path}: attributes 'input_spec'/'class_names'/'provenance' are missing "
                        f"or invalid ({err}); {fix}") from None
    n, h, w, c = images.shape
    if version > 1 and not spec.matches(images.shape):
        raise DataError(f"{path}: images are {h}x{w}x{c} but the input spec says "
                        f"{spec.image_size}x{spec.image_size}x{spec.channels}; {fix}")
    columns = tuple(name for name in COLUMNS if name in f)
    for name in columns:
        if f[name].shape[0] != n:
            raise DataError(f"{path}: '{name}' must have {n} rows; {fix}")
    return PreparedInfo(path, n, h, w, c, spec, provenance, columns)


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """The labels of a prepared file, without its pixels."""
    path = Path(path)
    with _open(path) as f:
        try:
            return f["labels"][...]
        except (OSError, KeyError) as err:
            raise DataError(f"{path}: reading the labels failed ({err}); delete it so that it is "
                            "prepared again") from None


def read_prepared(path: str | os.PathLike[str], images: bool = True) -> PreparedData:
    """Load a prepared file into memory, checking that its labels fit its class names; with
    ``images=False`` everything but the pixels (``images`` is then an empty (0, H, W, C) array:
    a streamed data set reads them as needed)."""
    path = Path(path)
    with _open(path) as f:
        info = _info(path, f)
        try:
            pixels = f["images"][...] if images else \
                np.empty((0, info.height, info.width, info.channels), np.uint8)
            labels = f["labels"][...]
            columns = {name: f[name][...] for name in info.columns}
        except OSError as err:
            raise DataError(f"{path}: reading the arrays failed (truncated or corrupt: {err}); "
                            "delete it so that it is prepared again") from None
    if "id" in columns:
        columns["id"] = columns["id"].astype(str)
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()} but the file names "
                        f"{info.num_classes} classes; delete it so that it is prepared again")
    split = columns.get("split")
    if split is not None and len(split) and split.max() > 2:
        raise DataError(f"{path}: 'split' values must be 0 (train), 1 (val) or 2 (test)")
    return PreparedData(info, pixels, labels, columns)


def provenance_matches(path: str | os.PathLike[str], expected: dict[str, Any]) -> bool:
    """True when ``path`` is a valid prepared file whose provenance has these entries.

    ``expected`` holds what determines the contents (source identity, parameters); the file's
    provenance may add results (counts, duplicates dropped) that are not compared.
    """
    try:
        info = read_info(path)
    except DataError:
        return False
    # Round-trip through JSON so that tuples/lists and int/float spellings compare equal.
    expected = json.loads(json.dumps(expected, sort_keys=True))
    return all(info.provenance.get(key) == value for key, value in expected.items())


def prepare_once(target: str | os.PathLike[str], provenance: dict[str, Any],
                 convert: Callable[[Path], None]) -> Path:
    """Return ``target``, made first by ``convert(target)`` unless it is a prepared file of this
    ``provenance`` (:func:`provenance_matches`): the one way every data source prepares its file.

    A matching file is reused without waiting for a lock. Otherwise the target's
    :func:`file_lock` is taken and the provenance checked again, since another process may have
    made the file meanwhile: processes started together make it once. ``convert`` writes it with
    a :class:`PreparedWriter`, which writes a temporary file and renames it into place only when
    complete, and removes it when conversion fails or is interrupted.
    """
    target = Path(target)
    if provenance_matches(target, provenance):
        return target
    with file_lock(target):
        if not provenance_matches(target, provenance):
            convert(target)
    return target
