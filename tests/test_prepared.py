"""The prepared-data format: round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from galaxy_lightning.data.prepared import (
    PreparedWriter,
    provenance_matches,
    read_info,
    read_prepared,
    write_prepared,
)
from galaxy_lightning.errors import GalaxyError

NAMES = ["a", "b", "c"]


def arrays(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64)


def test_round_trip(tmp_path: Path) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, NAMES, {"source": "test", "k": 1})
    data = read_prepared(path)
    assert np.array_equal(data.images, images) and np.array_equal(data.labels, labels)
    assert data.info.class_names == NAMES and data.info.provenance == {"source": "test", "k": 1}
    assert (data.info.num_images, data.info.height, data.info.width, data.info.channels) == (12, 8, 8, 3)
    assert data.split is None
    assert provenance_matches(path, {"source": "test", "k": 1})
    assert not provenance_matches(path, {"source": "test", "k": 2})


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, NAMES, {"v": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with PreparedWriter(path, 12, (8, 8, 3), NAMES, {"v": 2}) as writer:
            writer.write(images[:6], labels[:6])
            raise RuntimeError("killed half way")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5"]
    with pytest.raises(ValueError, match="wrote 6 of 12"):
        with PreparedWriter(tmp_path / "q.h5", 12, (8, 8, 3), NAMES, {}) as writer:
            writer.write(images[:6], labels[:6])
    assert not (tmp_path / "q.h5").exists()


def _mutate(path: Path, fn) -> None:
    with h5py.File(path, "a") as f:
        fn(f)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.__delitem__("labels"), "'labels' is missing"),
    (lambda f: (f.__delitem__("images"), f.create_dataset("images", data=np.zeros((12, 8, 8, 3), np.float32))),
     "'images' must be uint8"),
    (lambda f: f["labels"].__setitem__(0, 7), "labels span"),
    (lambda f: f.attrs.__setitem__("format", "other"), "not a galaxy_lightning prepared file"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, NAMES, {})
    _mutate(path, damage)
    with pytest.raises(GalaxyError, match=message) as err:
        read_prepared(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    images, labels = arrays(200)
    path = write_prepared(tmp_path / "p.h5", images, labels, NAMES, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalaxyError, match="truncated or corrupt"):
        read_prepared(path)
    with pytest.raises(GalaxyError, match="not found"):
        read_info(tmp_path / "absent.h5")
    assert not provenance_matches(path, {})
