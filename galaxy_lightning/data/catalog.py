"""A catalog plus a folder of cutouts -> the prepared format (``data=catalog``).

How astronomers have their data: a table (CSV, Parquet, a FITS or ECSV table; read with astropy)
with one row per object, and image files beside it: PNG/JPEG from the Legacy Surveys viewer, or
FITS from the survey, one file per object or one per band. Preparation:

1. read the catalog; check that every named column exists (the error lists the ones that do);
2. labels from a label column (integers, or class-name strings) or from Galaxy Zoo vote
   fractions (:func:`labels_from_votes`: the answer with the largest fraction, optionally with
   a minimum fraction and vote count, as Galaxy10 was made; the fractions are kept as soft
   targets);
3. select rows: classes to keep, duplicates by id or by sky position within a tolerance
   (astropy's coordinate matching), a split column, a seeded draw of images per class;
4. resolve image paths under the image root(s), by relative path or by file name;
5. read the images in worker processes, stretch FITS fluxes (the HDU, the NaN fill and the
   stretch are recorded in the input spec, so prediction reads new files the same way), crop and
   resize, and stream them into the prepared file, so memory does not grow with the catalog. A
   missing or unreadable image is counted and reported, and skipped or fatal (``on_error``).

The catalog and the images are only read, never modified.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galaxy_lightning import console
from galaxy_lightning.data.images import (
    ImageReader,
    check_stretch,
    fixed_limits,
    is_fits,
    read_flux,
    read_images,
    stretch_looks,
    stretch_tag,
    stretch_warning,
)
from galaxy_lightning.data.prepared import (
    PreparedWriter,
    announce,
    combine_parts,
    part_path,
    prepare_once,
    provenance_matches,
    read_info,
)
from galaxy_lightning.data.selection import (
    UNKNOWN_SPLIT,
    as_text,
    draw_per_class,
    relabel,
    repeats,
    repeats_on_sky,
    split_codes,
)
from galaxy_lightning.decision_tree import tree as decision_tree
from galaxy_lightning.errors import ConfigError, DataError, GalaxyError
from galaxy_lightning.input_spec import InputSpec, check_source_options

#: 2: the input spec records the FITS HDU and NaN policy; fixed stretch limits come from a seeded
#: sample of rows; 16-bit PNGs are scaled, not clipped (files of version 1 are rebuilt).
PREPARATION_VERSION = 2
#: Images read to estimate fixed stretch limits (``stretch.per_image=false`` without vmin/vmax).
LIMIT_SAMPLE = 64
#: Images written between two resume points of a preparation (and the size of its writes).
WRITE_BLOCK = 256
#: How far the vote fractions of one question may sum from 1 before the row is refused.
VOTE_SUM_TOLERANCE = 0.02


def check_part(part: tuple[int, int] | str) -> tuple[int, int]:
    """``(k, n)`` or ``"k/n"``: part k (0-based) of n; refused in one line when out of range."""
    try:
        k, n = (int(v) for v in (part.split("/") if isinstance(part, str) else part))
    except (ValueError, TypeError):
        raise ConfigError(f"--part {part!r}: give K/N, part K (0 to N-1) of N, e.g. 3/16") from None
    if not 0 <= k < n:
        raise ConfigError(f"--part {k}/{n}: K must be 0 to {n - 1} (N at least 1), e.g. 0/{max(n, 1)}")
    return k, n


def read_table(path: Path) -> Any:
    """An astropy Table of a CSV, Parquet, FITS or ECSV file (by its suffix)."""
    # deferred: astropy.table takes about a third of a second to import
    from astropy.table import Table

    name = path.name.lower()
    formats = {".csv": "ascii.csv", ".parquet": "parquet", ".pq": "parquet", ".ecsv": "ascii.ecsv",
               ".fits": "fits", ".fit": "fits", ".fits.gz": "fits"}
    fmt = next((f for suffix, f in formats.items() if name.endswith(suffix)), None)
    if fmt is None:
        raise ConfigError(f"catalog {path}: unknown table format; use a .csv, .parquet, .fits or "
                          ".ecsv file")
    if not path.is_file():
        raise DataError(f"{path}: catalog not found; set catalog to your table (absolute, or "
                        "relative to the data directory)")
    try:
        if fmt == "parquet":  # pyarrow directly: astropy's reader needs pandas as well
            import pyarrow.parquet as pq  # deferred: slow to import, and only for Parquet

            arrow = pq.read_table(path)
            return Table({name: _arrow_column(arrow.column(name)) for name in arrow.column_names})
        return Table.read(path, format=fmt)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable {fmt} table ({first[:200]})") from None


def _arrow_column(chunked: Any) -> Any:
    """A Parquet column as astropy reads the same column of a CSV: nulls masked, as blank cells
    are (``to_numpy`` alone turns a null string into None, i.e. the text "None"), text as str."""
    # deferred: pyarrow and astropy.table are slow to import, and only Parquet needs them here
    import pyarrow as pa
    import pyarrow.compute as pc
    from astropy.table import Column, MaskedColumn

    kind = chunked.type
    if pa.types.is_dictionary(kind):  # categorical columns (pandas): their values
        chunked = chunked.cast(kind.value_type)
        kind = kind.value_type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if chunked.null_count == 0:
        values = chunked.to_numpy(zero_copy_only=False)
        return Column(values.astype(str) if text else values)
    mask = chunked.is_null().to_numpy(zero_copy_only=False)
    fill: Any = ("" if text else b"" if pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                 else False if pa.types.is_boolean(kind)
                 else 0 if pa.types.is_integer(kind) or pa.types.is_floating(kind) else None)
    values = (chunked if fill is None else pc.fill_null(chunked, fill)).to_numpy(
        zero_copy_only=False)
    return MaskedColumn(values.astype(str) if text else values, mask=mask)


def _columns_hint(table: Any) -> str:
    names = list(table.colnames)
    shown = ", ".join(names[:25])
    return shown + (f", ... ({len(names) - 25} more)" if len(names) > 25 else "")


def table_column(table: Any, name: str, key: str, path: Path) -> np.ndarray:
    """Column ``name`` of a catalog as a plain array; empty cells become NaN (numbers) or ""
    (text), so that Parquet, FITS and CSV tables read alike. A missing column is a
    :class:`DataError` that lists the columns there are and names the option to set (``key``)."""
    if name not in table.colnames:
        raise DataError(f"{path}: no column '{name}' (columns: {_columns_hint(table)}); set {key}")
    column = table[name]
    if getattr(column, "mask", None) is not None and np.any(column.mask):
        if column.dtype.kind in "iuf":
            return np.asarray(column.astype(np.float64).filled(np.nan))
        return np.asarray(column.filled(""))
    return np.asarray(column)


def labels_from_votes(table: Any, path: Path, question: str, answers: Sequence[str] | None,
                      min_fraction: float, min_votes: int) -> tuple[np.ndarray, list[str],
                                                                     np.ndarray, dict[str, int]]:
    """Labels from Galaxy Zoo vote fractions (``<question>_<answer>_fraction`` and
    ``<question>_total-votes``): (label per row, -1 where dropped; answer names; the fraction
    vector per row; counts of rows dropped and why)."""
    prefix = f"{question}_"
    if answers is None:
        answers = [c[len(prefix):-len("_fraction")] for c in table.colnames
                   if c.startswith(prefix) and c.endswith("_fraction")]
        if not answers:
            raise DataError(f"{path}: no vote-fraction columns '{prefix}<answer>_fraction' "
                            f"(columns: {_columns_hint(table)}); set votes.question")
    answers = list(answers)
    fractions = np.stack([table_column(table, f"{prefix}{a}_fraction", "votes.answers", path)
                          .astype(np.float64) for a in answers], axis=1)
    total = table_column(table, f"{prefix}total-votes", "votes.question", path).astype(np.float64)
    voted = np.isfinite(fractions).all(1) & np.isfinite(total) & (total > 0)
    sums = np.where(voted, np.nan_to_num(fractions).sum(1), 1.0)
    off = np.flatnonzero(np.abs(sums - 1.0) > VOTE_SUM_TOLERANCE)
    if len(off):
        raise DataError(f"{path}: the '{question}' vote fractions of row {off[0]} sum to "
                        f"{sums[off[0]]:.3f}, not 1 ({len(off)} such rows); list every answer of "
                        "the question in votes.answers, or fix the catalog")
    fractions = np.nan_to_num(fractions)
    best = fractions.argmax(1)
    top = fractions.max(1)
    keep = voted & (top >= min_fraction) & (total >= min_votes)
    labels = np.where(keep, best, -1)
    dropped = {"no_votes": int((~voted).sum()),
               "below_min_votes": int((voted & (total < min_votes)).sum()),
               "below_min_fraction": int((voted & (total >= min_votes) & (top < min_fraction)).sum())}
    return labels, answers, fractions.astype(np.float32), dropped


def resolve_image_paths(table: Any, path: Path, roots: Sequence[Path], image_columns: Sequence[str],
                        match: str, rows: np.ndarray) -> tuple[list[tuple[Path, ...] | None], list[str]]:
    """The image files of each row (one per entry of ``image_columns``; None where a file is
    missing) and the names that did not resolve. An entry is a column of paths or a pattern of
    columns (``"{iauname}.png"``); ``match`` is ``"path"`` (relative to the roots, tried in order)
    or ``"name"`` (the file's name anywhere below the roots)."""
    per_band = []
    for entry in image_columns:
        if "{" in entry:
            keys = re.findall(r"{([^}:!]+)", entry)
            cols = {k: as_text(table_column(table, k, "image_columns", path))[rows] for k in keys}
            per_band.append([entry.format(**{k: cols[k][i] for k in keys})
                             for i in range(len(rows))])
        else:
            per_band.append(list(as_text(table_column(table, entry, "image_columns", path))[rows]))
    by_name: dict[str, Path] = {}
    if match == "name":
        for root in roots:
            for file in sorted(Path(root).rglob("*")):
                if file.is_file():
                    by_name.setdefault(file.name, file)
    resolved: list[tuple[Path, ...] | None] = []
    missing: list[str] = []
    for i in range(len(rows)):
        files = []
        for band in per_band:
            name = band[i].strip()
            found = by_name.get(Path(name).name) if match == "name" else next(
                (Path(r) / name for r in roots if name and (Path(r) / name).is_file()), None)
            if found is None:
                missing.append(name or f"(empty in row {rows[i]})")
                break
            files.append(found)
        resolved.append(tuple(files) if len(files) == len(per_band) else None)
    return resolved, missing


@dataclass(frozen=True)
class _ChosenRows:
    """The catalog rows a preparation reads, and what every catalog row was labelled as."""

    rows: np.ndarray  # row numbers in the catalog, sorted
    labels: np.ndarray  # every row's class among the kept ones, -1 for none
    names: list[str]  # the kept classes
    split: np.ndarray | None  # every row's split code, when the catalog fixes the split
    targets: np.ndarray | None  # every row's soft targets over the kept classes (vote fractions)
    dropped: dict[str, int]  # rows dropped before any image was read, by reason
    catalog_rows: int
    votes: np.ndarray | None = None  # every row's vote counts for the decision tree's answers
    totals_differ: dict[str, int] | None = None  # per question: rows whose answers' votes do not
    # add up to the catalog's total-votes (recorded, see DecisionTree.counts)


class CatalogSource:
    """Data source: a catalog (CSV, Parquet, FITS/ECSV table) and its image files.

    ``image_columns``: one entry per band (or one for the object): a column holding a path, or a
    pattern of columns such as ``"{iauname}.png"``. Paths are relative to ``image_root`` (one
    folder or a list, searched in order); ``match="name"`` instead finds each file by its name
    anywhere below the root(s), for releases whose folder layout differs from the catalog's
    paths (Galaxy Zoo DECaLS ``png_loc``). Labels come from ``label_column`` or ``votes``
    (``{question, answers, min_fraction, min_votes}``). ``tree`` (a built-in Galaxy Zoo decision
    tree, ``gz_decals_dr5``, or a mapping; :mod:`~galaxy_lightning.decision_tree`) keeps the vote
    counts of every answer of the tree (the ``votes`` column); without ``label_column`` or
    ``votes`` the labels are then the first question's most-voted answer. ``dedupe`` is ``null``, ``"id"`` or
    ``"position"`` (within ``dedupe_arcsec``). FITS fluxes are stretched with ``stretch``
    (``images.DEFAULT_STRETCH`` keys) after filling NaN pixels by ``nan``.
    """

    def __init__(self, catalog: str, image_columns: Sequence[str],
                 image_root: str | Sequence[str] | None = None, match: str = "path",
                 label_column: str | None = None, votes: Mapping[str, Any] | None = None,
                 class_names: Sequence[str] | None = None, classes: Sequence[Any] | None = None,
                 id_column: str | None = None, ra_column: str | None = None,
                 dec_column: str | None = None, split_column: str | None = None,
                 n_per_class: int | None = None, min_per_class: int = 2,
                 crop: int | None = None, resize: int | None = None,
                 dedupe: str | None = None, dedupe_arcsec: float = 1.0,
                 fits_hdu: int | str = 0, nan: str = "median",
                 stretch: Mapping[str, Any] | None = None, channels: int | None = None,
                 on_error: str = "skip", workers: int | None = None,
                 display: str | None = None, seed: int = 0,
                 prepared_name: str | None = None,
                 tree: str | Mapping[str, Any] | None = None) -> None:
        if isinstance(image_columns, str):
            image_columns = [image_columns]
        if not image_columns:
            raise ConfigError("image_columns must name at least one column (or pattern)")
        if label_column is not None and votes is not None:
            raise ConfigError("give exactly one of label_column and votes")
        if label_column is None and votes is None and tree is None:
            raise ConfigError("give exactly one of label_column and votes (or a decision tree, "
                              "whose first question then labels the galaxies)")
        if match not in ("path", "name"):
            raise ConfigError(f"match={match!r} must be 'path' or 'name'")
        if dedupe not in (None, "id", "position"):
            raise ConfigError(f"dedupe={dedupe!r} must be null, 'id' or 'position'")
        if dedupe == "id" and id_column is None:
            raise ConfigError("dedupe=id needs id_column")
        if dedupe == "position" and (ra_column is None or dec_column is None):
            raise ConfigError("dedupe=position needs ra_column and dec_column")
        if (ra_column is None) != (dec_column is None):
            raise ConfigError("give both ra_column and dec_column, or neither")
        if on_error not in ("skip", "error"):
            raise ConfigError(f"on_error={on_error!r} must be 'skip' or 'error'")
        check_source_options(n_per_class=n_per_class, crop=crop, resize=resize, display=display)
        if channels not in (None, 1, 3):
            raise ConfigError(f"channels={channels} must be 1, 3 or null (as the images are)")
        if votes is not None:
            unknown = sorted(set(votes) - {"question", "answers", "min_fraction", "min_votes"})
            if unknown or "question" not in votes:
                raise ConfigError(f"votes needs 'question' and takes answers, min_fraction, "
                                  f"min_votes (got {sorted(votes)})")
        if split_column is not None and n_per_class is not None:
            raise ConfigError("n_per_class cannot be combined with split_column (the catalog fixes "
                              "the split); set one of them to null")
        self.catalog = catalog
        self.image_columns = list(image_columns)
        roots = [image_root] if isinstance(image_root, (str, os.PathLike)) or image_root is None \
            else list(image_root)
        self.image_roots = roots
        self.match = match
        self.label_column = label_column
        self.votes = dict(votes) if votes is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.classes = list(classes) if classes is not None else None
        self.id_column = id_column
        self.ra_column = ra_column
        self.dec_column = dec_column
        self.split_column = split_column
        self.n_per_class = n_per_class
        self.min_per_class = min_per_class
        self.crop = crop
        self.resize = resize
        self.dedupe = dedupe
        self.dedupe_arcsec = float(dedupe_arcsec)
        self.fits_hdu = fits_hdu
        self.nan = nan
        self.stretch = check_stretch(stretch or {})
        self.channels = channels
        self.on_error = on_error
        self.workers = workers
        self.display = display
        self.seed = seed
        self.prepared_name = prepared_name
        self.tree = decision_tree(tree).to_dict() if tree is not None else None
        ImageReader(nan=nan)  # checks the NaN policy now, before any file is read

    # -- identity and caching ----------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "image_columns", "match", "label_column", "votes", "class_names", "classes",
            "id_column", "ra_column", "dec_column", "split_column", "n_per_class", "min_per_class",
            "crop", "resize", "dedupe", "dedupe_arcsec", "fits_hdu", "nan", "stretch",
            "channels", "on_error", "display", "seed")} | {"version": PREPARATION_VERSION} | (
            {"tree": self.tree} if self.tree is not None else {})

    def _path(self, value: str | None, data_dir: Path) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else data_dir / path

    def prepared_path(self, data_dir: Path) -> Path:
        """``<catalog stem>.prepared.h5``, or ``<stem>.<stretch tag>.prepared.h5`` for a stretch
        other than the default (:func:`stretch_tag`): runs of a sweep over stretches never share
        or overwrite one prepared file."""
        if self.prepared_name:
            return Path(data_dir) / self.prepared_name
        tag = stretch_tag(self.stretch)
        return Path(data_dir) / f"{Path(self.catalog).stem}{'.' + tag if tag else ''}.prepared.h5"

    def prepare(self, data_dir: str | Path, progress: bool = True,
                part: tuple[int, int] | None = None) -> Path:
        """Return the prepared file, building it first if it is missing or stale (the catalog
        changed, or a parameter did). Images changed in place are not detected: delete the
        prepared file to rebuild it.

        ``part=(k, n)`` prepares only the k-th (0-based) of n equal slices of the images, into
        its own file (:func:`~.prepared.part_path`), so that n processes or cluster jobs can share
        the work; a later call without ``part`` finds the n finished parts and combines them
        (:func:`~.prepared.combine_parts`: the pixels stay in the parts). Every preparation, whole
        or part, resumes after a kill from its last block of WRITE_BLOCK images."""
        data_dir = Path(data_dir)
        catalog = self._path(self.catalog, data_dir)
        assert catalog is not None
        roots = [self._path(r, data_dir) for r in self.image_roots] if self.image_roots != [None] \
            else [catalog.parent]
        st = catalog.stat() if catalog.is_file() else None
        identity = {"catalog": str(catalog.resolve()), "size": st.st_size if st else None,
                    "mtime_ns": st.st_mtime_ns if st else None,
                    "image_roots": [str(r.resolve()) for r in roots if r is not None]}
        expected = {"source": identity, "params": self.params}
        found = [r for r in roots if r is not None]
        target = self.prepared_path(data_dir)
        if part is not None:
            k, n = check_part(part)
            return prepare_once(part_path(target, k, n, expected), {**expected, "part": [k, n]},
                                lambda path: self._convert(catalog, found, path, expected,
                                                           progress, (k, n)))

        def make(path: Path) -> None:
            parts = self._finished_parts(path, expected)
            if parts:
                self._combine(path, parts, expected, progress)
            else:
                self._convert(catalog, found, path, expected, progress)

        return prepare_once(target, expected, make)

    @staticmethod
    def _finished_parts(target: Path, expected: dict[str, Any]) -> list[Path]:
        """The part files of ``target`` of this provenance when all n are there; [] when there
        are none; refused in one line when only some are (a part still running, or failed)."""
        found: dict[int, set[int]] = {}
        for file in target.parent.glob(part_path(target, "*", "*", expected).name):
            match = re.search(r"\.part-(\d+)-of-(\d+)\.h5$", file.name)
            if match is None:
                continue
            k, n = int(match[1]), int(match[2])
            if k < n and provenance_matches(file, {**expected, "part": [k, n]}):
                found.setdefault(n, set()).add(k)
        for n, done in sorted(found.items(), key=lambda item: -len(item[1]) / item[0]):
            if len(done) == n:
                return [part_path(target, k, n, expected) for k in range(n)]
            missing = sorted(set(range(n)) - done)
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise DataError(f"{target}: {len(done)} of {n} part files are prepared; parts "
                            f"{shown} are missing or unfinished: run galaxy-prepare --part K/{n} "
                            "for each (or delete the part files to prepare in one process)")
        return []

    def _combine(self, target: Path, parts: list[Path], expected: dict[str, Any],
                 progress: bool) -> None:
        """The prepared file from its finished parts: their counts added up, the class minimum
        checked over all of them, the pixels left in the parts."""
        infos = [read_info(p) for p in parts]
        names = infos[0].class_names
        counts = [info.provenance["counts"] for info in infos]
        per_class = {name: sum(c["per_class"][name] for c in counts) for name in names}
        self._check_per_class(target, per_class)
        total = sum(info.num_images for info in infos)
        announce(f"combining {len(parts)} parts into {target.name}: {total} images (the pixels "
                 "stay in the part files; keep them beside it)", progress)
        whole = {key: counts[0][key] for key in ("catalog_rows", "dropped", "missing_files",
                                                 "totals_differ") if key in counts[0]}
        provenance = {**expected, "class_names": names,
                      "counts": {**whole, "unreadable": sum(c["unreadable"] for c in counts),
                                 "per_class": per_class}}
        combine_parts(target, parts, provenance)

    def _check_per_class(self, catalog: Path, per_class: dict[str, int]) -> None:
        few = [f"{n} ({c})" for n, c in per_class.items() if c < self.min_per_class]
        if few:
            raise DataError(f"{catalog}: classes with fewer than {self.min_per_class} readable "
                            f"images: {', '.join(few)}; drop them with classes=[...] or add "
                            "images")

    # -- the steps ---------------------------------------------------------------------------------
    def _labels(self, table: Any, path: Path) -> tuple[np.ndarray, list[str], np.ndarray | None,
                                                       dict[str, int]]:
        """(label per row, -1 for rows without one; class names; soft targets or None; drops)."""
        if self.votes is None and self.label_column is None:  # the tree's first question
            assert self.tree is not None
            first = decision_tree(self.tree).questions[0]
            counts = np.stack([np.nan_to_num(table_column(table, c, "data.source.tree", path)
                                             .astype(np.float64)) for c in first.columns], axis=1)
            total = counts.sum(1)
            voted = total > 0
            fractions = counts / np.where(voted, total, 1.0)[:, None]
            labels = np.where(voted, counts.argmax(1), -1)
            return labels, list(first.answers), fractions.astype(np.float32), \
                {"no_votes": int((~voted).sum())}
        if self.votes is not None:
            v = self.votes
            return labels_from_votes(table, path, v["question"], v.get("answers"),
                                     float(v.get("min_fraction", 0.0) or 0.0),
                                     int(v.get("min_votes", 0) or 0))
        raw = table_column(table, self.label_column, "label_column", path)
        finite = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(len(raw), dtype=bool)
        if raw.dtype.kind in "iu" or (raw.dtype.kind == "f"
                                      and np.all(raw[finite] == np.round(raw[finite]))):
            values = np.where(finite, np.nan_to_num(raw), -1).astype(np.int64)
            if values[finite].min(initial=0) < 0:
                raise DataError(f"{path}: column '{self.label_column}' has negative labels; "
                                "labels are class numbers 0..K-1 or class names")
            names = self.class_names or [str(i) for i in range(int(values.max()) + 1)]
            if values.max() >= len(names):
                raise DataError(f"{path}: labels reach {values.max()} but class_names has "
                                f"{len(names)} names")
            return values, list(names), None, {"empty_label": int((~finite).sum())}
        text = as_text(raw)
        names = self.class_names or sorted({t for t in text if t.strip()})
        lookup = {n: i for i, n in enumerate(names)}
        labels = np.array([lookup.get(t, -1) for t in text], dtype=np.int64)
        unnamed = sorted({t for t in text if t not in lookup})
        if self.class_names is not None and unnamed:
            raise DataError(f"{path}: column '{self.label_column}' holds {unnamed[:3]}, not in "
                            "class_names; add them or remove class_names")
        return labels, list(names), None, {"empty_label": int((labels < 0).sum())}

    def _keep_classes(self, labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str],
                                                                             list[int]]:
        """Relabel to the kept classes (in the order of ``classes``); -1 for the others."""
        if self.classes is None:
            return labels, names, list(range(len(names)))
        chosen = []
        for c in self.classes:
            index = names.index(str(c)) if str(c) in names else (int(c) if isinstance(c, int)
                                                                  and 0 <= c < len(names) else None)
            if index is None:
                raise ConfigError(f"classes has {c!r}, not one of the catalog's classes {names}")
            chosen.append(index)
        return relabel(labels, chosen, len(names)), [names[i] for i in chosen], chosen

    def _duplicates(self, table: Any, path: Path, rows: np.ndarray) -> np.ndarray:
        """Mask over ``rows``: True for a repeat of an earlier row (same id, or within
        ``dedupe_arcsec`` on the sky)."""
        if self.dedupe == "id":
            ids = as_text(table_column(table, self.id_column, "id_column", path))[rows]
            return repeats(ids.astype(str))
        if self.dedupe == "position":
            ra = table_column(table, self.ra_column, "ra_column", path).astype(np.float64)[rows]
            dec = table_column(table, self.dec_column, "dec_column", path).astype(np.float64)[rows]
            return repeats_on_sky(ra, dec, self.dedupe_arcsec)
        return np.zeros(len(rows), dtype=bool)

    def _split(self, table: Any, path: Path) -> np.ndarray | None:
        """The split code of every catalog row (None without a split column)."""
        if self.split_column is None:
            return None
        values = as_text(table_column(table, self.split_column, "split_column", path))
        codes = split_codes(values)
        bad = sorted({v for v, c in zip(values, codes) if c == UNKNOWN_SPLIT})
        if bad:
            raise DataError(f"{path}: column '{self.split_column}' holds {bad[:3]}; use train/val/"
                            "test (or 0/1/2)")
        return codes

    def _image_paths(self, table: Any, catalog: Path, roots: list[Path], rows: np.ndarray
                     ) -> tuple[list[tuple[Path, ...] | None], list[str]]:
        """The image files of ``rows`` (None where missing) and the names that did not resolve;
        refused when none resolves, or any does not with ``on_error=error``."""
        paths, missing = resolve_image_paths(table, catalog, roots, self.image_columns, self.match,
                                             rows)
        if missing and (self.on_error == "error" or len(missing) == len(rows)):
            how = "by name anywhere below" if self.match == "name" else "under"
            hint = "" if self.match == "name" else "; or set match=name to find files by name"
            raise DataError(f"{catalog}: {len(missing)} of {len(rows)} image paths do not resolve "
                            f"{how} {', '.join(map(str, roots))} (first three: "
                            f"{', '.join(missing[:3])}); check image_root and image_columns{hint}")
        return paths, missing

    def _reader(self, paths: list[tuple[Path, ...]], catalog: Path) -> ImageReader:
        """The image reader, with fixed stretch limits estimated now if asked for: from a seeded
        random sample of the rows (the same for the same catalog and seed), not the first rows,
        which in a catalog sorted by class would all be one class."""
        stretch = dict(self.stretch)
        fits = is_fits(paths[0][0])
        if fits and not stretch["per_image"] and stretch["interval"] != "manual" \
                and stretch["vmin"] is None:
            picked = np.sort(np.random.default_rng(self.seed).choice(
                len(paths), min(LIMIT_SAMPLE, len(paths)), replace=False))
            sample = []
            for i in picked:
                try:
                    sample.append(read_flux(paths[i], self.fits_hdu, self.nan))
                except DataError:
                    continue
            if not sample:
                raise DataError(f"{catalog}: none of the {len(picked)} images sampled to fix the "
                                "stretch limits could be read; check the files, or give "
                                "stretch.vmin and stretch.vmax")
            # an object with other bands than most is refused when read, so it sets no limits
            bands = Counter(s.shape[-1] for s in sample).most_common(1)[0][0]
            sample = [s for s in sample if s.shape[-1] == bands]
            if len({s.shape for s in sample}) > 1:
                sample = [s.reshape(-1, s.shape[-1]) for s in sample]
            stretch = fixed_limits(sample, stretch)
        return ImageReader(self.channels, self.fits_hdu, self.nan, stretch if fits else None)

    def _convert(self, catalog: Path, roots: list[Path], target: Path, expected: dict[str, Any],
                 progress: bool, part: tuple[int, int] | None = None) -> None:
        """Write the prepared file (or one part of it): choose the rows, find and read their
        images, stream them in."""
        table = read_table(catalog)
        if len(table) == 0:
            raise DataError(f"{catalog}: the catalog has no rows")
        chosen = self._choose_rows(table, catalog)
        paths, missing = self._image_paths(table, catalog, roots, chosen.rows)
        jobs = [(i, p) for i, p in enumerate(paths) if p is not None]
        reader = self._reader([p for _, p in jobs], catalog)
        first = self._first_image(reader, jobs)
        spec = self._spec(first, chosen.names, reader, [p for _, p in jobs])
        reader.spec = spec
        columns = self._row_columns(table, catalog, chosen)
        notes = [f"{k.replace('_', ' ')} {v}" for k, v in chosen.dropped.items() if v]
        notes += [f"missing files {len(missing)}"] if missing else []
        dropped = f" (dropped: {', '.join(notes)})" if notes else ""
        provenance = {**expected, "class_names": chosen.names}
        of, total = "", len(jobs)
        if part is not None:  # the same rows, reader and spec as the whole; a slice of the images
            k, n = part
            start, stop = len(jobs) * k // n, len(jobs) * (k + 1) // n
            if start == stop:
                raise DataError(f"{catalog}: part {k} of {n} has no images ({len(jobs)} in all); "
                                "use fewer parts")
            of = f"part {k} of {n}: images {start}..{stop - 1} of the "
            jobs = jobs[start:stop]
            provenance["part"] = [k, n]
        announce(f"preparing {target.name} from {catalog.name}: {of}{total} images of "
                 f"{chosen.catalog_rows} rows{dropped}", progress)
        resume = json.dumps({"provenance": provenance, "images": len(jobs)}, sort_keys=True)
        examples, unreadable, looks = self._write(target, catalog, reader, jobs, chosen, columns,
                                                  provenance, len(missing), progress, resume)
        # FITS: warn once when most stretched images are saturated or sky-grey (images.py's rule)
        warning = stretch_warning(*looks) if spec.stretch is not None else None
        if warning:
            announce(f"{target.name}: {warning}", progress, logging.WARNING)
        for what, count, items in (("missing", len(missing), missing),
                                   ("unreadable", unreadable, examples)):
            if count:
                note = (f"{target.name}: skipped {count} {what} image(s), e.g. "
                        f"{'; '.join(items[:3])}")
                announce(note, progress, logging.WARNING)

    def _choose_rows(self, table: Any, catalog: Path) -> _ChosenRows:
        """The rows whose images will be read: labelled, of a kept class, not a repeat, and
        drawn per class (``n_per_class``); with what was dropped on the way."""
        labels, names, targets, dropped = self._labels(table, catalog)
        labels, names, chosen = self._keep_classes(labels, names)
        if targets is not None:
            targets = targets[:, chosen]
            sums = targets.sum(1, keepdims=True)
            targets = np.divide(targets, sums, out=np.zeros_like(targets), where=sums > 0)
        split = self._split(table, catalog)
        rows = np.flatnonzero(labels >= 0)
        dropped["other_classes"] = int(len(table) - len(rows) - sum(dropped.values()))
        repeat = self._duplicates(table, catalog, rows)
        dropped["duplicates"] = int(repeat.sum())
        rows = draw_per_class(rows[~repeat], labels, self.n_per_class, self.seed, catalog,
                              [f"'{name}'" for name in names], "rows")
        votes, differ = None, None
        if self.tree is not None:
            schema = decision_tree(self.tree)
            schema.check_columns(table.colnames, catalog)
            votes, differ = schema.counts(
                lambda name: table_column(table, name, "data.source.tree", catalog), catalog)
        return _ChosenRows(rows, labels, names, split, targets, dropped, len(table), votes, differ)

    def _row_columns(self, table: Any, catalog: Path, chosen: _ChosenRows) -> dict[str, np.ndarray]:
        """The optional prepared columns (:data:`~galaxy_lightning.data.prepared.COLUMNS`) of the
        chosen rows that this catalog has: source row, identity, split and soft targets."""
        rows = chosen.rows
        ids = as_text(table_column(table, self.id_column, "id_column", catalog))[rows] \
            if self.id_column else None
        ra = table_column(table, self.ra_column, "ra_column", catalog).astype(np.float64)[rows] \
            if self.ra_column else None
        dec = table_column(table, self.dec_column, "dec_column", catalog).astype(np.float64)[rows] \
            if self.dec_column else None
        columns = {"source_index": rows, "id": ids, "ra": ra, "dec": dec,
                   "split": chosen.split[rows] if chosen.split is not None else None,
                   "targets": chosen.targets[rows] if chosen.targets is not None else None,
                   "votes": chosen.votes[rows] if chosen.votes is not None else None}
        return {k: v for k, v in columns.items() if v is not None}

    def _write(self, target: Path, catalog: Path, reader: ImageReader,
               jobs: list[tuple[int, tuple[Path, ...]]], chosen: _ChosenRows,
               columns: dict[str, np.ndarray], provenance: dict[str, Any], missing: int,
               progress: bool, resume: str) -> tuple[list[str], int, tuple[int, int, int]]:
        """Stream the images of ``jobs`` into the prepared file, read in worker processes for
        long lists, resumably (``resume``: the writer's key): after every block the writer
        records how many jobs are done, so a killed preparation goes on from there. Return up to
        three errors of the images that could not be read (skipped), how many there were, and
        how many images were written, saturated and sky-grey (:func:`~.images.stretch_looks`)."""
        workers = self.workers if self.workers is not None else (
            min(os.cpu_count() or 1, 8) if len(jobs) >= 256 else 0)
        with PreparedWriter(target, len(jobs), reader.spec, provenance, tuple(columns),
                            at_most=True, resume=resume) as writer, \
                console.progress(total=len(jobs), unit="img", desc=f"preparing {target.name}",
                                 enabled=progress) as bar:
            state = {"done": 0, "unreadable": 0, "examples": [], "looks": [0, 0], **writer.state}
            if state["done"]:
                announce(f"resuming {target.name} at image {state['done']} of {len(jobs)} "
                         "(a killed preparation of the same catalog and settings)", progress)
                bar.update(state["done"])
            start = state["done"]
            unreadable: list[str] = []
            for block, consumed in self._readable(read_images(reader, jobs[start:], workers),
                                                  bar, unreadable, WRITE_BLOCK):
                index = np.array([i for i, _ in block], dtype=np.int64)
                labels = chosen.labels[chosen.rows[index]]
                images = np.stack([img for _, img in block]) if block else \
                    np.zeros((0, *writer.image_shape), np.uint8)
                if block:
                    writer.write(images, labels, **{k: v[index] for k, v in columns.items()})
                if block and reader.spec.stretch is not None:  # FITS: how the stretch came out
                    state["looks"] = (np.asarray(state["looks"]) + stretch_looks(images)).tolist()
                state["done"] = start + consumed
                state["unreadable"] += len(unreadable)
                state["examples"] = (state["examples"] + unreadable)[:3]
                unreadable.clear()
                writer.checkpoint(state)
            counts = np.bincount(writer.written_labels(), minlength=len(chosen.names))
            if "part" not in provenance:  # a part's classes are checked when they are combined
                self._check_per_class(catalog, dict(zip(chosen.names, counts.tolist())))
            provenance["counts"] = {"catalog_rows": chosen.catalog_rows, "dropped": chosen.dropped,
                                    "missing_files": missing, "unreadable": state["unreadable"],
                                    "per_class": dict(zip(chosen.names, counts.tolist()))}
            if chosen.totals_differ is not None:
                provenance["counts"]["totals_differ"] = chosen.totals_differ
            writer.provenance = provenance
        looks = state["looks"]
        return state["examples"], state["unreadable"], (int(counts.sum()), int(looks[0]),
                                                        int(looks[1]))

    def _readable(self, results: Iterable[tuple[int, np.ndarray | GalaxyError]], bar: Any,
                  unreadable: list[str], size: int
                  ) -> Iterator[tuple[list[tuple[int, np.ndarray]], int]]:
        """Blocks of up to ``size`` (index, image) read, each with the number of results consumed
        so far; an unreadable image is fatal (``on_error=error``) or skipped, its error appended
        to ``unreadable``. The last block may be empty (only unreadable images after the last
        full block)."""
        block: list[tuple[int, np.ndarray]] = []
        consumed = 0
        for index, result in results:
            bar.update(1)
            consumed += 1
            if isinstance(result, Exception):
                if self.on_error == "error":
                    raise DataError(f"{result}; fix or remove the file, or set on_error=skip")
                unreadable.append(str(result))
                continue
            block.append((index, result))
            if len(block) >= size:
                yield block, consumed
                block = []
        if block or unreadable:
            yield block, consumed

    def _first_image(self, reader: ImageReader, jobs: list[tuple[int, tuple[Path, ...]]]
                     ) -> np.ndarray:
        errors = []
        for _, files in jobs[:20]:
            try:
                return reader(files)
            except GalaxyError as err:
                errors.append(str(err))
        raise DataError(f"none of the first {len(errors)} images could be read: {errors[0]}")

    def _spec(self, first: np.ndarray, names: list[str], reader: ImageReader,
              paths: list[tuple[Path, ...]]) -> InputSpec:
        """The input spec from the first image's shape and the geometry keys; without a crop or
        resize every image must have the first one's shape."""
        h, w, c = first.shape
        fits = is_fits(paths[0][0])
        stretch = reader.stretch if reader.stretch is not None and fits else None
        spec = InputSpec.for_source(names, h, w, c, self.crop, self.resize, str(paths[0][0]),
                                    self.display, stretch=stretch,
                                    fits={"hdu": self.fits_hdu, "nan": self.nan} if fits else None,
                                    tree=self.tree)
        if self.crop is None and self.resize is None:
            for files in paths[1:50]:
                try:
                    shape = reader(files).shape
                except GalaxyError:
                    continue
                if shape[:2] != (h, w):
                    raise ConfigError(f"images differ in size ({paths[0][0].name} is {h}x{w}, "
                                      f"{files[0].name} is {shape[0]}x{shape[1]}); set crop or "
                                      "resize so that every image becomes the same size")
        return spec
