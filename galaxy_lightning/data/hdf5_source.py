"""Convert an HDF5 file of labelled images into the prepared format (``data=hdf5``, and Galaxy10).

One conversion serves every real-data source:

1. check the source's keys, dtypes and shapes (one-line errors naming the file, key and fix);
2. pick rows (with :mod:`~galaxy_lightning.data.selection`, as every source does): optional
   de-duplication of repeated sky positions (``dedupe_keys``, e.g. ra/dec: the same galaxy
   twice would leak between splits), class selection with relabelling to 0..K-1, and a seeded
   draw of ``n_per_class`` images per class;
3. stream the chosen rows in blocks aligned to the file's HDF5 chunks (a 2.5 GB source needs well
   under 1 GB of memory), center-crop and optionally resize them, and convert float or grayscale
   pixels to uint8 (N, H, W, C);
4. write the prepared file atomically with provenance (source identity, parameters, counts), and
   reuse it while the source and the parameters are unchanged.

The source file is only ever opened read-only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from galaxy_lightning import console
from galaxy_lightning.data.prepared import PreparedWriter, announce, prepare_once
from galaxy_lightning.data.selection import (
    UNKNOWN_SPLIT,
    as_text,
    draw_per_class,
    relabel,
    repeats,
    split_codes,
)
from galaxy_lightning.errors import ConfigError, DataError
from galaxy_lightning.input_spec import InputSpec, check_source_options

PREPARATION_VERSION = 1


class HDF5Source:
    """Data source: images and labels from an HDF5 file (a user's own, or Galaxy10's).

    ``path`` is absolute or relative to the data directory. Images are (N, H, W) grayscale or
    (N, H, W, C), uint8 or float (float pixels are multiplied by ``float_scale``, default 255,
    i.e. taken to lie in [0, 1]). ``class_names`` lists a name for every label value; without it
    the file's ``class_names`` attribute is used, then the label numbers. ``classes`` keeps and
    relabels a subset of label values (in that order). ``split_key`` names an array of
    'train'/'val'/'test' (or 0/1/2) that fixes the split instead of ``data.splits``. ``ra`` and
    ``dec`` arrays (degrees) and an ``id_key`` array, when present, are carried into the prepared
    file, so that predictions and the gallery of mistakes can name the objects.
    """

    def __init__(self, path: str, images_key: str = "images", labels_key: str = "labels",
                 class_names: list[str] | None = None, classes: list[int] | None = None,
                 n_per_class: int | None = None, crop: int | None = None,
                 resize: int | None = None, split_key: str | None = None,
                 dedupe_keys: list[str] | None = None, seed: int = 0,
                 float_scale: float = 255.0, prepared_name: str | None = None,
                 display: str | None = None, id_key: str | None = None) -> None:
        check_source_options(n_per_class=n_per_class, crop=crop, resize=resize, display=display)
        if split_key is not None and n_per_class is not None:
            raise ConfigError("n_per_class cannot be combined with split_key (the file fixes the "
                              "split); set one of them to null")
        self.path = path
        self.images_key = images_key
        self.labels_key = labels_key
        self.class_names = list(class_names) if class_names is not None else None
        self.classes = [int(c) for c in classes] if classes is not None else None
        self.n_per_class = n_per_class
        self.crop = crop
        self.resize = resize
        self.split_key = split_key
        self.dedupe_keys = list(dedupe_keys) if dedupe_keys else None
        self.seed = seed
        self.float_scale = float_scale
        self.prepared_name = prepared_name
        self.display = display
        self.id_key = id_key

    # -- what subclasses change ----------------------------------------------------------------
    def source_file(self, data_dir: Path, progress: bool = True) -> Path:
        """The source file, present and (for published data) verified."""
        path = Path(self.path)
        path = path if path.is_absolute() else Path(data_dir) / path
        if not path.is_file():
            raise DataError(f"{path} not found; set path to your HDF5 file (absolute, or relative "
                            "to the data directory)")
        return path

    def source_identity(self, source: Path) -> dict[str, Any]:
        """What identifies the source's contents (a user's file: its name, size and mtime)."""
        st = source.stat()
        return {"file": source.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    # -- preparation ---------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        return {"images_key": self.images_key, "labels_key": self.labels_key,
                "class_names": self.class_names, "classes": self.classes,
                "n_per_class": self.n_per_class, "crop": self.crop, "resize": self.resize,
                "split_key": self.split_key, "dedupe_keys": self.dedupe_keys, "seed": self.seed,
                "float_scale": self.float_scale, "display": self.display, "id_key": self.id_key,
                "version": PREPARATION_VERSION}

    def prepared_path(self, data_dir: Path) -> Path:
        return Path(data_dir) / (self.prepared_name or f"{Path(self.path).stem}.prepared.h5")

    def prepare(self, data_dir: str | Path, progress: bool = True) -> Path:
        """Return the prepared file, converting the source first if it is missing or stale."""
        data_dir = Path(data_dir)
        source = self.source_file(data_dir, progress)
        expected = {"source": self.source_identity(source), "params": self.params}
        target = self.prepared_path(data_dir)
        if target.resolve() == source.resolve():
            raise ConfigError(f"prepared_name={self.prepared_name!r} would overwrite the source "
                              f"{source}; choose another name")
        return prepare_once(target, expected,
                            lambda path: self._convert(source, path, expected, progress))

    def _convert(self, source: Path, target: Path, expected: dict[str, Any], progress: bool) -> None:
        try:
            f = h5py.File(source, "r")
        except OSError as err:
            raise DataError(f"{source}: not a readable HDF5 file (truncated or corrupt: {err}); "
                            "replace it with a complete copy") from None
        with f:
            images, labels, names = self._check(source, f)
            rows, new_labels, split, stats = self._select(source, f, labels, names)
            n, h, w = len(rows), *images.shape[1:3]
            channels = images.shape[3] if images.ndim == 4 else 1
            chosen_names = [names[c] for c in (self.classes or range(len(names)))]
            spec = InputSpec.for_source(chosen_names, h, w, channels, self.crop, self.resize,
                                        str(source), self.display)
            message = (f"preparing {target.name} from {source.name}: {n} images of "
                       f"{stats['source_rows']}, {stats['duplicates_dropped']} repeated positions "
                       f"dropped, per class {stats['kept_per_class']}")
            announce(message, progress)
            provenance = {**expected, "counts": stats, "class_names": chosen_names}
            # the objects' identity, when the source has it, for outputs that name objects
            identity = {name: np.asarray(f[key][...])[rows] for name, key in
                        (("id", self.id_key), ("ra", "ra"), ("dec", "dec"))
                        if key is not None and key in f and f[key].shape == (len(labels),)}
            if "id" in identity:
                identity["id"] = as_text(identity["id"])
            columns = {"source_index": rows, **({"split": split} if split is not None else {}),
                       **identity}
            with PreparedWriter(target, n, spec, provenance, tuple(columns)) as writer, \
                    console.progress(total=n, unit="img", desc=f"preparing {target.name}",
                                     enabled=progress) as bar:
                for lo, hi, pixels in self._blocks(source, images, rows):
                    pixels = spec.conform(pixels)  # the source crop, then the resize
                    writer.write(np.ascontiguousarray(pixels), new_labels[lo:hi],
                                 **{k: v[lo:hi] for k, v in columns.items()})
                    bar.update(hi - lo)

    def _blocks(self, source: Path, images: h5py.Dataset, rows: np.ndarray
                ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(lo, hi, uint8 pixels of rows[lo:hi])``, reading the source in blocks aligned to
        its HDF5 chunks, so that memory stays small however large the file is."""
        block = max(1, (images.chunks or (64,))[0])
        block *= max(1, 128 // block)
        starts = np.searchsorted(rows, np.arange(0, images.shape[0] + block, block))
        for b, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            if lo == hi:
                continue
            first = b * block
            try:
                chunk = images[first:min(first + block, images.shape[0])]
            except OSError as err:
                raise DataError(f"{source}: reading rows {first}.. of '{self.images_key}' "
                                f"failed (truncated or corrupt: {err}); replace the "
                                "file with a complete copy") from None
            yield lo, hi, self._to_uint8(chunk[rows[lo:hi] - first], source, rows[lo:hi])

    def _check(self, source: Path, f: h5py.File) -> tuple[h5py.Dataset, np.ndarray, list[str]]:
        keys = ", ".join(sorted(f.keys()))
        for key, what in ((self.images_key, "images_key"), (self.labels_key, "labels_key")):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise DataError(f"{source}: key '{key}' not found (keys: {keys}); set "
                                f"{what}")
        images = f[self.images_key]
        if images.ndim not in (3, 4) or images.shape[0] == 0:
            raise DataError(f"{source}: '{self.images_key}' has shape {images.shape}; expected "
                            "(N, H, W) or (N, H, W, C) with N > 0")
        if not (images.dtype == np.uint8 or images.dtype.kind == "f"):
            raise DataError(f"{source}: '{self.images_key}' is {images.dtype}; expected uint8 or "
                            "float pixels")
        try:
            labels = f[self.labels_key][...]
        except OSError as err:
            raise DataError(f"{source}: reading '{self.labels_key}' failed (truncated or corrupt: "
                            f"{err}); replace the file with a complete copy") from None
        if labels.shape != (images.shape[0],):
            raise DataError(f"{source}: '{self.labels_key}' has shape {labels.shape}; expected "
                            f"({images.shape[0]},), one label per image")
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iu":
            raise DataError(f"{source}: '{self.labels_key}' holds non-integer labels "
                            f"({labels.dtype}); labels must be class numbers 0..K-1")
        labels = labels.astype(np.int64)
        names = self.class_names
        if names is None and "class_names" in f.attrs:
            raw = f.attrs["class_names"]
            names = [str(x.decode() if isinstance(x, bytes) else x) for x in
                     (np.atleast_1d(raw) if not isinstance(raw, str) else json.loads(raw))]
        if names is None:
            names = [str(i) for i in range(int(labels.max()) + 1)]
        if labels.min() < 0 or labels.max() >= len(names):
            raise DataError(f"{source}: labels span {labels.min()}..{labels.max()} but there are "
                            f"{len(names)} class names; fix the labels or class_names")
        for c in self.classes or []:
            if not 0 <= c < len(names):
                raise ConfigError(f"classes has {c}, not a label of {source} "
                                  f"(0..{len(names) - 1})")
        return images, labels, names

    def _select(self, source: Path, f: h5py.File, labels: np.ndarray, names: list[str]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
        """Rows to keep (sorted), their new labels, their split codes, and counts for provenance."""
        repeat = np.zeros(len(labels), dtype=bool)
        if self.dedupe_keys:
            for key in self.dedupe_keys:
                if key not in f:
                    raise DataError(f"{source}: de-duplication key '{key}' not found; set "
                                    "dedupe_keys (or null)")
            repeat = repeats(np.stack([np.asarray(f[k][...], dtype=np.float64)
                                       for k in self.dedupe_keys], 1))
        classes = self.classes if self.classes is not None else list(range(len(names)))
        kept_labels = relabel(labels, classes, len(names))
        candidates = np.flatnonzero(~repeat & (kept_labels >= 0))
        available = {names[c]: int((kept_labels[candidates] == k).sum())
                     for k, c in enumerate(classes)}
        rows = draw_per_class(candidates, kept_labels, self.n_per_class, self.seed, source,
                              [f"{c} ({names[c]})" for c in classes],
                              "images after de-duplication" if self.dedupe_keys else "images")
        if len(rows) == 0:
            raise DataError(f"{source}: no images left after selecting classes {classes}; check "
                            "classes")
        split = self._split(source, f)[rows] if self.split_key is not None else None
        new_labels = kept_labels[rows]
        stats = {"source_rows": int(len(labels)), "duplicates_dropped": int(repeat.sum()),
                 "available_per_class": available,
                 "kept_per_class": {names[c]: int((new_labels == i).sum())
                                    for i, c in enumerate(classes)}}
        return rows.astype(np.int64), new_labels, split, stats

    def _split(self, source: Path, f: h5py.File) -> np.ndarray:
        """The split codes of every row of the source, from its ``split_key`` array."""
        if self.split_key not in f:
            raise DataError(f"{source}: split key '{self.split_key}' not found; set "
                            "split_key (or null)")
        values = np.asarray(f[self.split_key][...])
        codes = split_codes(values)
        if (codes == UNKNOWN_SPLIT).any():
            bad = values[np.flatnonzero(codes == UNKNOWN_SPLIT)[0]]
            bad = bad.decode() if isinstance(bad, bytes) else bad.item() if hasattr(bad, "item") else bad
            raise DataError(f"{source}: split key '{self.split_key}' holds {bad!r}; use "
                            "'train'/'val'/'test' or 0/1/2")
        return codes

    def _to_uint8(self, pixels: np.ndarray, source: Path, source_rows: np.ndarray) -> np.ndarray:
        if pixels.ndim == 3:
            pixels = pixels[..., None]
        if pixels.dtype == np.uint8:
            return pixels
        finite = np.isfinite(pixels)
        if not finite.all():
            bad = int(np.argwhere(~finite.reshape(len(pixels), -1).all(1))[0, 0])
            raise DataError(f"{source}: '{self.images_key}' has NaN or infinite pixels (row "
                            f"{source_rows[bad]}); clean the file or drop those rows")
        return np.clip(np.rint(pixels.astype(np.float32) * self.float_scale), 0, 255).astype(np.uint8)
