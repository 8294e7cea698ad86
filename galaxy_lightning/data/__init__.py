"""Data: sources that write the prepared HDF5 format, and the DataModule that reads it."""

from galaxy_lightning.data.datamodule import GalaxyDataModule
from galaxy_lightning.data.prepared import PreparedWriter, read_info, read_prepared

__all__ = ["GalaxyDataModule", "PreparedWriter", "read_info", "read_prepared"]
