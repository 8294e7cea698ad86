"""Galaxy10 DECaLS (astroNN): the real data of the tutorial.

The source file ``Galaxy10_DECals.h5`` (2.54 GB, 17,736 images 256x256x3, 10 classes) is looked
for under the data directory.
"""

from __future__ import annotations

from pathlib import Path

from galaxy_lightning.errors import GalaxyError

ZENODO_URL = "https://zenodo.org/records/10845026/files/Galaxy10_DECals.h5"
SHA256 = "19aefc477c41bb7f77ff07599a6b82a038dc042f889a111b0d4d98bb755c1571"


class Galaxy10DECaLS:
    """Data source for the tutorial's 7-class subset of Galaxy10 DECaLS."""

    def __init__(self, filename: str = "Galaxy10_DECals.h5") -> None:
        self.filename = filename

    def prepare(self, data_dir: str | Path, progress: bool = True) -> Path:
        source = Path(data_dir) / self.filename
        if not source.is_file():
            raise GalaxyError(
                f"{source} not found: download it from {ZENODO_URL} (sha256 {SHA256[:12]}...) into "
                f"{Path(data_dir)}, or point paths.data_dir at its folder; for offline data use "
                "data=synthetic (or experiment=quickstart)")
        raise GalaxyError(f"{source}: preparing the Galaxy10 subset is not available in this "
                          "version; use data=synthetic")
