"""Small files with the real Galaxy10 layouts, for tests (the real ones are 2.5 GB and 210 MB)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

DECALS_COUNTS = (12, 30, 30, 30, 6, 30, 30, 30, 12, 30)  # per label; 7 tutorial classes have 30


def marked_image(row: int, size: int = 256) -> np.ndarray:
    """An image whose pixels tell where they came from: the row in the center, corners of the
    96-px center crop marked, everything else a gradient."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0] = np.arange(size, dtype=np.uint8)[:, None]  # red = source row coordinate
    img[..., 1] = np.arange(size, dtype=np.uint8)[None, :]  # green = source column coordinate
    c = size // 2
    img[c, c, 2] = row % 251
    img[c + 1, c, 2] = row // 251
    return img


def write_decals(path: Path, counts: tuple[int, ...] = DECALS_COUNTS, duplicates: int = 4,
                 seed: int = 0) -> dict:
    """A Galaxy10_DECals.h5 look-alike: same keys and dtypes, gzip-chunked 256x256x3 images.

    The last ``duplicates`` rows repeat the sky positions (ra, dec) of earlier rows of label 2.
    """
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, k, dtype=np.uint8) for k, n in enumerate(counts)])
    rng.shuffle(labels)
    n = len(labels)
    ra = rng.uniform(0, 360, n)
    dec = rng.uniform(-30, 80, n)
    twins = np.flatnonzero(labels == 2)[:duplicates]
    dup_rows = np.flatnonzero(labels == 2)[-duplicates:]
    ra[dup_rows], dec[dup_rows] = ra[twins], dec[twins]
    redshift = rng.uniform(0, 0.3, n)
    redshift[::7] = np.nan
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (n, 256, 256, 3), dtype=np.uint8,
                                  chunks=(1, 256, 256, 3), compression="gzip", compression_opts=1)
        for row in range(n):
            images[row] = marked_image(row)
        f.create_dataset("ans", data=labels)
        f.create_dataset("ra", data=ra)
        f.create_dataset("dec", data=dec)
        f.create_dataset("redshift", data=redshift)
        f.create_dataset("pxscale", data=np.full(n, 0.262))
    return {"labels": labels, "duplicate_rows": dup_rows, "twins": twins}


def write_sdss(path: Path, per_class: int = 8) -> np.ndarray:
    """A Galaxy10.h5 (SDSS) look-alike: 69x69x3 uint8 images, keys images/ans."""
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=rng.integers(0, 256, (len(labels), 69, 69, 3), dtype=np.uint8))
        f.create_dataset("ans", data=labels)
    return labels
