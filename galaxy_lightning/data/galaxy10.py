"""Galaxy10 DECaLS and Galaxy10 SDSS (astroNN): published files, downloaded and verified.

Both are :class:`~galaxy_lightning.data.hdf5_source.HDF5Source` conversions with the published
keys, class names, URLs and SHA256 (this module is the one place that holds them; the configs
``conf/data/galaxy10*.yaml`` only choose among them), plus a download step: a missing file is
fetched from Zenodo (then the older mirror), resumably, and renamed into place only after its
checksum matches. A file put there by hand is verified the same way, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from galaxy_lightning.data.download import download, verify
from galaxy_lightning.data.hdf5_source import HDF5Source
from galaxy_lightning.errors import DataError

DECALS_URLS = (
    "https://zenodo.org/records/10845026/files/Galaxy10_DECals.h5",
    "https://www.astro.utoronto.ca/~hleung/shared/Galaxy10/Galaxy10_DECals.h5",
)
DECALS_SHA256 = "19aefc477c41bb7f77ff07599a6b82a038dc042f889a111b0d4d98bb755c1571"
#: Label: name (astroNN's table has a stale name for label 3; this is the current list).
DECALS_CLASSES = [
    "Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth",
    "Barred Spiral", "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge",
    "Edge-on with Bulge",
]
#: Images per label in the published file (17,736 in all).
DECALS_COUNTS = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)
#: The tutorial's 7 classes: those with at least 1,800 images.
TUTORIAL_CLASSES = (1, 2, 3, 5, 6, 7, 9)
#: Their names, in the tutorial's order (also the simulator's classes).
TUTORIAL_CLASS_NAMES = tuple(DECALS_CLASSES[label] for label in TUTORIAL_CLASSES)

SDSS_URLS = ("https://zenodo.org/records/10844811/files/Galaxy10.h5",)
SDSS_SHA256 = "969a6b1cefcc36e09fffa86febd2f699a4aa19b837ba0427f01b0bc6ded458af"
SDSS_CLASSES = [
    "Disk, Face-on, No Spiral", "Smooth, Completely round", "Smooth, in-between round",
    "Smooth, Cigar shaped", "Disk, Edge-on, Rounded Bulge", "Disk, Edge-on, Boxy Bulge",
    "Disk, Edge-on, No Bulge", "Disk, Face-on, Tight Spiral", "Disk, Face-on, Medium Spiral",
    "Disk, Face-on, Loose Spiral",
]


class _Published(HDF5Source):
    """An HDF5Source whose file has a published URL and checksum."""

    def __init__(self, filename: str, urls: Sequence[str], sha256: str | None, download: bool,
                 timeout: float, **kwargs: Any) -> None:
        super().__init__(path=filename, **kwargs)
        self.urls = list(urls)
        self.sha256 = sha256
        self.download = download
        self.timeout = timeout

    def source_file(self, data_dir: Path, progress: bool = True) -> Path:
        target = Path(data_dir) / self.path
        if self.download:
            return download(self.urls, target, self.sha256, self.timeout, progress=progress)
        if not target.is_file():
            raise DataError(f"{target} not found and download=false: download it from "
                            f"{self.urls[0]} and put it at {target}; for offline data use "
                            "data=synthetic (or experiment=quickstart)")
        verify(target, self.sha256, progress)
        return target

    def source_identity(self, source: Path) -> dict[str, Any]:
        if self.sha256 is None:
            return super().source_identity(source)
        return {"file": source.name, "sha256": self.sha256}


class Galaxy10DECaLS(_Published):
    """The tutorial's data: Galaxy10 DECaLS, 7 classes x 1,800, center-cropped 256 -> 96."""

    def __init__(self, filename: str = "Galaxy10_DECals.h5", urls: Sequence[str] = DECALS_URLS,
                 sha256: str | None = DECALS_SHA256, download: bool = True, timeout: float = 60.0,
                 classes: Sequence[int] | None = TUTORIAL_CLASSES, n_per_class: int | None = 1800,
                 crop: int | None = 96, resize: int | None = None, dedupe: bool = True,
                 seed: int = 0, prepared_name: str | None = None) -> None:
        super().__init__(filename, urls, sha256, download, timeout, images_key="images",
                         labels_key="ans", class_names=DECALS_CLASSES,
                         classes=list(classes) if classes is not None else None,
                         n_per_class=n_per_class, crop=crop, resize=resize,
                         dedupe_keys=["ra", "dec"] if dedupe else None, seed=seed,
                         prepared_name=prepared_name)


class Galaxy10SDSS(_Published):
    """The original Galaxy10 (SDSS): 21,785 images of 69x69, all 10 classes or a subset."""

    def __init__(self, filename: str = "Galaxy10.h5", urls: Sequence[str] = SDSS_URLS,
                 sha256: str | None = SDSS_SHA256, download: bool = True, timeout: float = 60.0,
                 classes: Sequence[int] | None = None, n_per_class: int | None = None,
                 crop: int | None = None, resize: int | None = None, seed: int = 0,
                 prepared_name: str | None = None) -> None:
        super().__init__(filename, urls, sha256, download, timeout, images_key="images",
                         labels_key="ans", class_names=SDSS_CLASSES,
                         classes=list(classes) if classes is not None else None,
                         n_per_class=n_per_class, crop=crop, resize=resize, seed=seed,
                         prepared_name=prepared_name)
