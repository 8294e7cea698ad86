"""galaxy-prepare: make a run's prepared data file without training, whole or one part at a time.

Takes the same config overrides as ``galaxy-train`` (``data=catalog data.source.catalog=...``)
and prepares exactly the file that a run of that config would use, so the expensive step can run
on its own: before a sweep, on a CPU node before a GPU job, or split over a cluster's array job::

    galaxy-prepare --part $SLURM_ARRAY_TASK_ID/16 data=catalog data.source.catalog=gz.csv ...
    galaxy-prepare data=catalog data.source.catalog=gz.csv ...      # combines the 16 parts

``--part K/N`` prepares the K-th (0-based) of N equal slices of the catalog's images into its
own file; the run (or ``galaxy-prepare`` without ``--part``) that finds all N parts finished
combines them into the prepared file without copying the pixels. Every preparation resumes
after a kill from its last block of images.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from galaxy_lightning.config import CONFIG_PACKAGE, construct, validate_config
from galaxy_lightning.data.catalog import check_part
from galaxy_lightning.data.prepared import read_info
from galaxy_lightning.errors import ConfigError, cli_boundary


def prepare(overrides: list[str], part: str | None = None, progress: bool = True) -> Path:
    """The prepared file (or part file) of the run config these overrides compose."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except Exception as err:  # Hydra's own override and config errors: one line
        raise ConfigError(f"{str(err).splitlines()[0]}; overrides are as for galaxy-train, "
                          "e.g. data=catalog data.source.catalog=my.csv") from None
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):  # no run directory: preparing writes only into the data directory
        cfg.paths.output_dir = os.getcwd()
    validate_config(cfg)
    source = construct(cfg.data.source, "data.source")
    data_dir = Path(str(cfg.data.data_dir))
    if part is None:
        return Path(source.prepare(data_dir, progress=progress))
    if "part" not in inspect.signature(source.prepare).parameters:
        raise ConfigError(f"--part: data source {type(source).__name__} prepares in one process "
                          "only; parts are for data=catalog (images read one file at a time)")
    return Path(source.prepare(data_dir, progress=progress, part=check_part(part)))


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--part", metavar="K/N",
                        help="prepare only part K (0 to N-1) of N of the images, into its own file "
                             "(e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for galaxy-train")
    args = parser.parse_args(argv)
    path = prepare(args.overrides, args.part)
    info = read_info(path)
    print(f"prepared {path}: {info.num_images} images of {info.height}x{info.width}x"
          f"{info.channels}, {info.num_classes} classes")


if __name__ == "__main__":
    main()
