"""Helpers that only the tests use (kept out of the package, which has no use for them)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galaxy_lightning.data.images import (
    DEFAULT_STRETCH,
    is_fits,
    read_flux,
    read_raster,
    stretch_to_uint8,
)
from galaxy_lightning.data.prepared import PreparedWriter
from galaxy_lightning.input_spec import InputSpec

# -- data: the prepared format, image files, augmentation -----------------------------------------

#: The inverse of symmetry k of ``augment.dihedral`` (rotations by 90 and 270 degrees invert each
#: other; flips are their own inverse).
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def write_prepared(path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray,
                   spec: InputSpec, provenance: dict[str, Any], **columns: np.ndarray) -> Path:
    """Write whole in-memory arrays as a prepared file (atomically)."""
    with PreparedWriter(path, len(images), spec, provenance, tuple(columns)) as writer:
        writer.write(images, labels, **columns)
    return Path(path)


def read_image(paths: Sequence[Path], *, channels: int | None = None, hdu: int | str = 0,
               nan: str = "median", stretch: Mapping[str, Any] | None = None) -> np.ndarray:
    """One object's image: (H, W, C) uint8 from one file or one file per band.

    FITS fluxes are NaN-filled and stretched with ``stretch`` (complete parameters, see
    ``images.check_stretch``); PNG/JPEG pixels are taken as they are.
    """
    if len(paths) == 1 and not is_fits(paths[0]):
        return read_raster(paths[0], channels)
    return stretch_to_uint8(read_flux(paths, hdu, nan), stretch or DEFAULT_STRETCH)
