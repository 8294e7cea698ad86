"""galaxy-stretch: see how FITS cutouts look under each stretch before training on them.

A stretch that saturates the source or turns the sky grey costs accuracy without any error, so
pick it by eye on your own cutouts: this renders a seeded sample of them in rows, one column per
stretch (the default, linear min/max, log, asinh with a stronger softening, the previous
default, zscale; for three bands also Lupton et al.'s colour composite), each column labelled with the config keys that select it::

    galaxy-stretch cutouts/ --n 8 --out stretch_preview.png
    galaxy-stretch --catalog cat.csv --image-root cutouts --image-columns "{objid}_r.fits"

Every image goes through the training path (NaN fill, then ``images.stretch_to_uint8``), so what
you see is what the network gets.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galaxy_lightning.data.images import (
    DEFAULT_STRETCH,
    KIND_KEYS,
    NAN_POLICIES,
    check_stretch,
    is_fits,
    read_flux,
    stretch_to_uint8,
)
from galaxy_lightning.errors import ConfigError, DataError, cli_boundary
from galaxy_lightning.files import atomic_file


@dataclass(frozen=True)
class Column:
    """One stretch of the preview: its label, its complete parameters, and the training command's
    overrides that select it (those that differ from the default)."""

    label: str
    params: dict[str, Any]

    @property
    def keys(self) -> str:
        default = {**DEFAULT_STRETCH, **KIND_KEYS.get(self.params["kind"], {})}
        changed = [f"data.source.stretch.{k}={_value(v)}" for k, v in self.params.items()
                   if v != default[k]]
        return " ".join(changed) if changed else "(the default: no keys)"


def _value(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


#: The stretches compared, in column order: the default first, then the usual alternatives.
#: asinh's softening ``a`` is 0.1 in the default (astropy's) and in the previous default.
COLUMNS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default: asinh, sky", {}),
    ("linear, min/max", {"kind": "linear", "interval": "minmax"}),
    ("log, sky", {"kind": "log"}),
    ("asinh a=0.01, sky", {"a": 0.01}),
    ("asinh a=0.1, percentile\n(the previous default)", {"a": 0.1, "interval": "percentile"}),
    ("linear, zscale", {"kind": "linear", "interval": "zscale"}),
)


#: For three bands, the colour composite of Lupton et al. (2004) as a further column.
LUPTON_COLUMN: tuple[str, dict[str, Any]] = ("Lupton RGB, Q=3, sky", {"kind": "lupton"})


def preview_columns(bands: int = 1) -> list[Column]:
    """The compared stretches with complete, checked parameters (Lupton's too for 3 bands)."""
    chosen = COLUMNS + ((LUPTON_COLUMN,) if bands == 3 else ())
    return [Column(label, check_stretch(params)) for label, params in chosen]


def find_fits(inputs: list[str]) -> list[tuple[Path, ...]]:
    """One single-file object per FITS file given or found below a folder (sorted)."""
    objects: list[tuple[Path, ...]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            objects += [(f,) for f in sorted(path.rglob("*")) if f.is_file() and is_fits(f)]
        elif not path.is_file():
            raise DataError(f"{path}: no such file or folder; give FITS files or folders of them")
        elif not is_fits(path):
            raise DataError(f"{path}: not a FITS file (.fits, .fit, .fts, .fz, .fits.gz); PNG and "
                            "JPEG cutouts are displayed already and need no stretch")
        else:
            objects.append((path,))
    return objects


def catalog_objects(catalog: str, image_root: str | None, image_columns: list[str],
                    match: str) -> list[tuple[Path, ...]]:
    """The image files (one per band) of every catalog row whose files all exist, as
    ``data=catalog`` finds them."""
    # deferred: the catalog reader pulls in astropy.table and the data sources
    from galaxy_lightning.data.catalog import read_table, resolve_image_paths

    path = Path(catalog).expanduser()
    table = read_table(path)
    roots = [Path(image_root).expanduser() if image_root else path.parent]
    paths, _ = resolve_image_paths(table, path, roots, image_columns, match,
                                   np.arange(len(table)))
    return [p for p in paths if p is not None]


def _rgb(image: np.ndarray) -> np.ndarray:
    """A stretched (H, W, C) uint8 image as the example grids show it (plots.display_bands)."""
    from galaxy_lightning.plots import display_bands

    bands, _ = display_bands(image.shape[-1])
    shown = image[..., list(bands)]
    return np.repeat(shown, 3, axis=-1) if shown.shape[-1] == 1 else shown


def preview(objects: list[tuple[Path, ...]], out: Path, n: int = 8, seed: int = 0,
            hdu: int | str = 0, nan: str = "median") -> list[Column]:
    """Render ``n`` seeded objects (rows) under every stretch of :data:`COLUMNS` into ``out`` (PNG),
    each column headed by its name and footed by its keys; return the columns."""
    # deferred: matplotlib is slow to import
    import matplotlib.pyplot as plt

    if n < 1:
        raise ConfigError(f"--n={n} must be a positive number of cutouts")
    if nan not in NAN_POLICIES:
        raise ConfigError(f"--nan={nan!r} must be one of {list(NAN_POLICIES)}")
    if not objects:
        raise DataError("no FITS cutouts found; give FITS files, folders of them, or a catalog "
                        "with --image-columns naming FITS files")
    picked = np.sort(np.random.default_rng(seed).choice(len(objects), min(n, len(objects)),
                                                         replace=False))
    fluxes = [(objects[i][0].name, read_flux(objects[i], hdu, nan)) for i in picked]
    columns = preview_columns(fluxes[0][1].shape[-1])
    rows, cols = len(fluxes), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 1.3), squeeze=False)
    for r, (name, flux) in enumerate(fluxes):
        for c, column in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(_rgb(stretch_to_uint8(flux, column.params)), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column.label, fontsize=8)
            if c == 0:
                ax.set_ylabel(name[:24], fontsize=7)
            if r == rows - 1:
                ax.set_xlabel(column.keys.replace(" data.", "\ndata."), fontsize=6)
    fig.suptitle(f"{rows} FITS cutouts (seed {seed}) under each stretch; under each column, the "
                 "keys to add to the training command", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return columns


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-stretch", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="FITS files or folders of them")
    parser.add_argument("--catalog", help="instead of files: a catalog (as data=catalog reads it)")
    parser.add_argument("--image-root", help="the folder the catalog's paths are relative to "
                                             "(default: the catalog's)")
    parser.add_argument("--image-columns", nargs="+", default=None,
                        help="the catalog's image columns or patterns, one per band")
    parser.add_argument("--match", default="path", choices=("path", "name"))
    parser.add_argument("--n", type=int, default=8, help="cutouts shown (8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (0)")
    parser.add_argument("--hdu", default="0", help="the FITS HDU, number or name (0)")
    parser.add_argument("--nan", default="median", help="NaN fill: median, zero or error")
    parser.add_argument("--out", default="stretch_preview.png", help="the PNG to write")
    args = parser.parse_args(argv)
    if args.catalog is not None:
        if not args.image_columns:
            raise ConfigError("--catalog needs --image-columns (the columns or patterns naming "
                              "each object's FITS files)")
        objects = catalog_objects(args.catalog, args.image_root, args.image_columns, args.match)
    else:
        if not args.inputs:
            raise ConfigError("give FITS files or folders, or --catalog with --image-columns")
        objects = find_fits(args.inputs)
    hdu: int | str = int(args.hdu) if args.hdu.lstrip("-").isdigit() else args.hdu
    out = Path(args.out)
    columns = preview(objects, out, args.n, args.seed, hdu, args.nan)
    print(f"wrote {out}: {min(args.n, len(objects))} of {len(objects)} cutouts under "
          f"{len(columns)} stretches; the keys of each:")
    for column in columns:
        print(f"  {column.label.splitlines()[0]}: {column.keys}")


if __name__ == "__main__":
    main()
