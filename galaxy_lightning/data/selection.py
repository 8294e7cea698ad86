"""Choosing the rows of a labelled source: the one implementation every data source uses.

A source (an HDF5 file, a catalog) reads its labels, split values and identity columns its own
way; what happens to them then is the same everywhere, so that the same parameters pick the same
rows whatever the file type:

- :func:`relabel`: keep a subset of the classes, renumbered 0..K-1 in the order given;
- :func:`repeats` / :func:`repeats_on_sky`: rows that repeat an earlier one (the same galaxy
  twice would leak between the splits);
- :func:`draw_per_class`: a seeded draw of ``n_per_class`` rows of every class;
- :func:`split_codes`: split values (train/val/test, 0/1/2) -> the prepared ``split`` codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from galaxy_lightning.errors import DataError

#: Split values understood as train / val / test (compared without case and surrounding space).
SPLIT_VALUES = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "test": 2,
                "testing": 2, "0": 0, "1": 1, "2": 2}
#: The split code of a value that is not one of :data:`SPLIT_VALUES`.
UNKNOWN_SPLIT = 255


def as_text(values: np.ndarray) -> np.ndarray:
    """Values as an object array of ``str`` (bytes decoded): ids and split values compare and
    are written the same whether a file stored them as text, bytes or numbers."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def relabel(labels: np.ndarray, chosen: Sequence[int], num_classes: int) -> np.ndarray:
    """Labels renumbered to the kept classes, 0..len(chosen)-1 in the order of ``chosen``; -1 for
    the other classes and for rows without a label (-1)."""
    mapping = np.full(num_classes, -1, dtype=np.int64)
    mapping[list(chosen)] = np.arange(len(chosen))
    return np.where(labels >= 0, mapping[np.clip(labels, 0, None)], -1)


def repeats(keys: np.ndarray) -> np.ndarray:
    """True for each row whose key (one value, or a row of values such as a position) equals an
    earlier row's: the first occurrence is kept."""
    _, first = np.unique(keys, return_index=True, **({"axis": 0} if keys.ndim > 1 else {}))
    repeat = np.ones(len(keys), dtype=bool)
    repeat[first] = False
    return repeat


def repeats_on_sky(ra: np.ndarray, dec: np.ndarray, arcsec: float) -> np.ndarray:
    """True for each row within ``arcsec`` on the sky of an earlier row (degrees in): catalogs
    list one galaxy at slightly different positions, so exact equality misses repeats."""
    # deferred: astropy.coordinates takes about half a second to import
    from astropy import units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    coords = SkyCoord(ra * u.deg, dec * u.deg)
    i, j, _, _ = search_around_sky(coords, coords, arcsec * u.arcsec)
    repeat = np.zeros(len(ra), dtype=bool)
    repeat[np.unique(j[j > i])] = True  # each pair once; the later row repeats the earlier one
    return repeat


def draw_per_class(rows: np.ndarray, labels: np.ndarray, n_per_class: int | None, seed: int,
                   path: Path, class_labels: Sequence[str], unit: str) -> np.ndarray:
    """``n_per_class`` of ``rows`` (sorted row numbers) of every class k (``labels[row] == k``),
    drawn with a generator seeded by ``seed`` and returned sorted; all of ``rows`` when
    ``n_per_class`` is None. A class with fewer rows is refused, named by ``class_labels[k]``,
    its rows counted in ``unit``."""
    if n_per_class is None:
        return rows
    rng = np.random.default_rng(seed)
    picked = []
    for k, name in enumerate(class_labels):
        members = rows[labels[rows] == k]
        if len(members) < n_per_class:
            raise DataError(f"{path}: class {name} has {len(members)} {unit}, fewer than "
                            f"n_per_class={n_per_class}; lower it")
        picked.append(rng.choice(members, n_per_class, replace=False))
    return np.sort(np.concatenate(picked)) if picked else rows[:0]


def split_codes(values: np.ndarray) -> np.ndarray:
    """uint8 split codes (0 train, 1 val, 2 test) of split values: text or bytes of
    :data:`SPLIT_VALUES`, or the integers 0/1/2; :data:`UNKNOWN_SPLIT` for anything else, for the
    source to report in its own terms."""
    return np.array([SPLIT_VALUES.get(v.strip().lower(), UNKNOWN_SPLIT) for v in as_text(values)],
                    dtype=np.uint8)
