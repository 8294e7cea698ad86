"""Data sources: Galaxy10 download and preparation, users' own HDF5 files (offline, small files)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from omegaconf import DictConfig

from galaxy_lightning.data.download import download
from galaxy_lightning.data.galaxy10 import Galaxy10DECaLS, Galaxy10SDSS
from galaxy_lightning.data.hdf5_source import HDF5Source
from galaxy_lightning.data.prepared import read_info, read_prepared
from galaxy_lightning.errors import ConfigError, DataError, GalaxyError
from galaxy_lightning.train import build_and_prepare, main

from .cli import in_process
from .conftest import FileServer
from .galaxy10_files import write_decals, write_sdss


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def decals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, bytes]:
    path = tmp_path_factory.mktemp("src") / "Galaxy10_DECals.h5"
    meta = write_decals(path)
    return path, meta, path.read_bytes()


def leftovers(d: Path) -> list[str]:
    """Partial or temporary files (the empty .lock files that serialise preparations are not)."""
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")
                  and (p.name.endswith((".part", ".tmp")) or p.name.startswith(".")))


# -- download ------------------------------------------------------------------------------------
def test_download_verifies_and_renames_into_place(tmp_path: Path, http_server: FileServer,
                                                 decals: tuple) -> None:
    _, _, data = decals
    http_server.files["/g.h5"] = data
    target = download([http_server.url("/g.h5")], tmp_path / "g.h5", sha(data), progress=False)
    assert target.read_bytes() == data
    assert leftovers(tmp_path) == []
    assert (tmp_path / "g.h5.sha256").is_file()  # verification cached for later runs
    n = len(http_server.requests)
    download([http_server.url("/g.h5")], tmp_path / "g.h5", sha(data), progress=False)
    assert len(http_server.requests) == n  # present and verified: nothing fetched again


def test_download_resumes_after_the_server_drops_the_connection(tmp_path: Path,
                                                                http_server: FileServer,
                                                                decals: tuple) -> None:
    _, _, data = decals
    http_server.files["/g.h5"] = data
    http_server.drop_after = len(data) // 3
    target = download([http_server.url("/g.h5")], tmp_path / "g.h5", sha(data), progress=False)
    assert target.read_bytes() == data
    assert http_server.requests[0][1] is None
    assert http_server.requests[1][1] == f"bytes={len(data) // 3}-"  # resumed, not restarted


def test_download_resumes_a_partial_file_left_by_an_earlier_run(tmp_path: Path,
                                                                 http_server: FileServer,
                                                                 decals: tuple) -> None:
    _, _, data = decals
    http_server.files["/g.h5"] = data
    (tmp_path / "g.h5.part").write_bytes(data[:1000])
    download([http_server.url("/g.h5")], tmp_path / "g.h5", sha(data), progress=False)
    assert http_server.requests == [("/g.h5", "bytes=1000-")]
    assert (tmp_path / "g.h5").read_bytes() == data


def test_checksum_mismatch_leaves_nothing_behind(tmp_path: Path, http_server: FileServer) -> None:
    http_server.files["/g.h5"] = b"not the galaxy file" * 100
    with pytest.raises(DataError, match="SHA256 mismatch") as err:
        download([http_server.url("/g.h5")], tmp_path / "g.h5", "0" * 64, progress=False)
    assert "download it by hand" in str(err.value) and str(tmp_path / "g.h5") in str(err.value)
    assert leftovers(tmp_path) == [] and not (tmp_path / "g.h5").exists()


def test_404_falls_back_to_the_mirror_and_reports_when_all_fail(tmp_path: Path,
                                                                http_server: FileServer) -> None:
    data = b"x" * 5000
    http_server.files["/mirror.h5"] = data
    urls = [http_server.url("/missing.h5"), http_server.url("/mirror.h5")]
    assert download(urls, tmp_path / "a.h5", sha(data), progress=False).read_bytes() == data
    with pytest.raises(DataError, match="HTTP 404") as err:
        download([http_server.url("/missing.h5")], tmp_path / "b.h5", sha(data), progress=False)
    assert "\n" not in str(err.value) and str(tmp_path / "b.h5") in str(err.value)
    assert not (tmp_path / "b.h5").exists()


def test_timeout_gives_a_clear_message(tmp_path: Path, http_server: FileServer) -> None:
    http_server.files["/slow.h5"] = b"y" * 100
    http_server.delay = 2.0
    t0 = time.monotonic()
    with pytest.raises(DataError, match="could not download slow.h5"):
        download([http_server.url("/slow.h5")], tmp_path / "slow.h5", None, timeout=0.3,
                 retries=2, progress=False)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "slow.h5").exists()


def test_a_corrupt_file_put_by_hand_is_refused_and_kept(tmp_path: Path) -> None:
    bad = tmp_path / "Galaxy10_DECals.h5"
    bad.write_bytes(b"half a file")
    source = Galaxy10DECaLS(urls=[], download=True)
    with pytest.raises(DataError, match="does not match the published"):
        source.prepare(tmp_path, progress=False)
    assert bad.read_bytes() == b"half a file"  # the user's file is never modified or deleted


# -- preparation of the tutorial subset ----------------------------------------------------------
def decals_source(path: Path, **kwargs) -> Galaxy10DECaLS:
    args = {"urls": [], "sha256": sha(path.read_bytes()), "n_per_class": 20}
    args.update(kwargs)
    return Galaxy10DECaLS(**args)


def test_prepares_the_tutorial_subset(tmp_path: Path, decals: tuple) -> None:
    src, meta, data = decals
    (tmp_path / src.name).write_bytes(data)
    prepared = decals_source(tmp_path / src.name).prepare(tmp_path, progress=False)
    out = read_prepared(prepared)
    assert out.info.class_names == ["Merging", "Round Smooth", "In-between Round Smooth",
                                    "Barred Spiral", "Unbarred Tight Spiral",
                                    "Unbarred Loose Spiral", "Edge-on with Bulge"]
    assert np.bincount(out.labels).tolist() == [20] * 7
    assert out.images.shape == (140, 96, 96, 3) and out.images.dtype == np.uint8
    with h5py.File(prepared) as f:
        rows = f["source_index"][...]
    labels = meta["labels"]
    # Relabelling: source labels {1,2,3,5,6,7,9} -> 0..6, in that order.
    assert np.array_equal(np.array([1, 2, 3, 5, 6, 7, 9])[out.labels], labels[rows])
    # Repeated sky positions: only the first of each pair can be chosen.
    assert not set(meta["duplicate_rows"].tolist()) & set(rows.tolist())
    counts = out.info.provenance["counts"]
    assert counts["duplicates_dropped"] == 4
    assert counts["available_per_class"]["Round Smooth"] == 26
    assert out.info.provenance["source"]["sha256"] == sha(data)
    # Crop geometry: 256 -> 96 keeps source rows/columns 80..175.
    img = out.images[0]
    assert img[0, 0, 0] == 80 and img[0, 0, 1] == 80
    assert img[95, 95, 0] == 175 and img[95, 95, 1] == 175
    for k in range(len(rows)):  # each image is the source row it claims to be
        assert out.images[k, 48, 48, 2] + 251 * out.images[k, 49, 48, 2] == rows[k]
    assert (tmp_path / src.name).read_bytes() == data  # the source is untouched
    assert leftovers(tmp_path) == []


def test_prepared_file_is_reused_until_the_parameters_change(tmp_path: Path, decals: tuple) -> None:
    src, _, data = decals
    (tmp_path / src.name).write_bytes(data)
    first = decals_source(tmp_path / src.name).prepare(tmp_path, progress=False)
    stamp = os.stat(first).st_mtime_ns
    assert decals_source(tmp_path / src.name).prepare(tmp_path, progress=False) == first
    assert os.stat(first).st_mtime_ns == stamp
    resized = decals_source(tmp_path / src.name, crop=128, resize=64, n_per_class=10)
    assert resized.prepare(tmp_path, progress=False) == first
    info = read_info(first)
    assert (info.num_images, info.height) == (70, 64)
    assert info.provenance["params"]["crop"] == 128


def test_too_few_images_in_a_class(tmp_path: Path, decals: tuple) -> None:
    src, _, data = decals
    (tmp_path / src.name).write_bytes(data)
    with pytest.raises(DataError, match=r"class 2 \(Round Smooth\) has 26 images after "
                                        r"de-duplication, fewer than n_per_class=28"):
        decals_source(tmp_path / src.name, n_per_class=28).prepare(tmp_path, progress=False)
    assert leftovers(tmp_path) == [] and not (tmp_path / "Galaxy10_DECals.prepared.h5").exists()


def test_sdss_all_classes_and_a_subset(tmp_path: Path) -> None:
    src = tmp_path / "Galaxy10.h5"
    labels = write_sdss(src)
    digest = sha(src.read_bytes())
    out = read_prepared(Galaxy10SDSS(urls=[], sha256=digest).prepare(tmp_path, progress=False))
    assert out.images.shape == (80, 69, 69, 3) and out.info.num_classes == 10
    assert np.array_equal(np.sort(out.labels), np.sort(labels))
    sub = Galaxy10SDSS(urls=[], sha256=digest, classes=[1, 7], prepared_name="sub.h5")
    out = read_prepared(sub.prepare(tmp_path, progress=False))
    assert out.info.class_names == ["Smooth, Completely round", "Disk, Face-on, Tight Spiral"]
    assert np.bincount(out.labels).tolist() == [8, 8]


# -- a user's own HDF5 --------------------------------------------------------------------------
def write_user(path: Path, **overrides) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.random((60, 40, 40)).astype(np.float32),  # grayscale floats in [0, 1]
        "y": np.repeat(np.arange(3), 20).astype(np.int32),
        "part": np.array([b"train"] * 40 + [b"val"] * 10 + [b"test"] * 10),
    }
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value)
        f.attrs["class_names"] = json.dumps(["elliptical", "spiral", "irregular"])


def test_user_file_grayscale_floats_names_and_split(tmp_path: Path,
                                                    make_cfg: Callable[..., DictConfig]) -> None:
    write_user(tmp_path / "mine.h5")
    cfg = make_cfg("data=hdf5", f"data.source.path={tmp_path / 'mine.h5'}", "data.source.labels_key=y",
                   "data.source.images_key=x", "data.source.split_key=part", "data.source.crop=32",
                   "data.splits=[0.8,0.1,0.1]", tiny=False)
    datamodule, module, _ = build_and_prepare(cfg)
    info = datamodule.info
    assert (info.channels, info.height, info.num_classes) == (1, 32, 3)
    assert info.class_names == ["elliptical", "spiral", "irregular"]
    assert [len(datamodule.split(s)) for s in ("train", "val", "test")] == [40, 10, 10]
    assert module.net.features[0].in_channels == 1 and module.net.classifier.out_features == 3
    with h5py.File(tmp_path / "mine.h5") as f:
        expected = np.rint(f["x"][0, 4:36, 4:36] * 255).astype(np.uint8)
    assert np.array_equal(read_prepared(datamodule.path).images[0, ..., 0], expected)


@pytest.mark.parametrize("overrides, kwargs, message", [
    ({}, {"labels_key": "labels"}, "key 'labels' not found (keys: part, x, y); set labels_key"),
    ({"x": np.zeros((60, 40, 40), np.int16)}, {}, "'x' is int16; expected uint8 or float"),
    ({"x": np.zeros((60, 40), np.uint8)}, {}, "expected (N, H, W) or (N, H, W, C)"),
    ({"y": np.arange(60) % 6}, {}, "labels span 0..5 but there are 3 class names"),
    ({"y": np.linspace(0, 2, 60)}, {}, "non-integer labels"),
    ({"y": np.arange(59) % 3}, {}, "expected (60,), one label per image"),
    ({"x": np.where(np.arange(60)[:, None, None] == 33, np.nan, 0.5).repeat(40, 1).repeat(40, 2)},
     {}, "NaN or infinite pixels (row 33)"),
    ({}, {"n_per_class": 30}, "has 20 images, fewer than n_per_class=30"),
    ({}, {"classes": [7]}, "classes has 7"),
    ({}, {"crop": 64}, "crop=64 is larger than the 40x40 images"),
    ({"part": np.array([b"train"] * 59 + [b"holdout"])}, {"split_key": "part"}, "holds 'holdout'"),
])
def test_bad_user_files_are_refused_cleanly(tmp_path: Path, overrides: dict, kwargs: dict,
                                            message: str) -> None:
    write_user(tmp_path / "mine.h5", **overrides)
    before = (tmp_path / "mine.h5").read_bytes()
    args = {"path": "mine.h5", "images_key": "x", "labels_key": "y"}
    args.update(kwargs)
    with pytest.raises(GalaxyError) as err:
        HDF5Source(**args).prepare(tmp_path, progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    # nothing half-written (only the empty lock file that serialises preparations)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["mine.h5"]
    assert (tmp_path / "mine.h5").read_bytes() == before


def test_truncated_source_and_splits_larger_than_the_data(tmp_path: Path,
                                                          make_cfg: Callable[..., DictConfig]) -> None:
    write_user(tmp_path / "mine.h5")
    data = (tmp_path / "mine.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(GalaxyError, match="truncated or corrupt"):
        HDF5Source("cut.h5", "x", "y").prepare(tmp_path, progress=False)
    cfg = make_cfg("data=hdf5", f"data.source.path={tmp_path / 'mine.h5'}", "data.source.images_key=x",
                   "data.source.labels_key=y", "data.splits=[50,10,10]", tiny=False)
    with pytest.raises(ConfigError, match=r"^data: splits=\[50, 10, 10\] needs 70 images but .* holds 60"):
        build_and_prepare(cfg)  # checked from the prepared file's header, before any pixel is loaded
    cfg = make_cfg("data=hdf5", "data.splits=[50,5,5]", tiny=False)
    with pytest.raises(ConfigError, match="data.source.path.*has no value"):
        from galaxy_lightning.config import validate_config
        validate_config(cfg)


def test_empty_split_in_the_file_is_reported(tmp_path: Path, make_cfg: Callable[..., DictConfig]) -> None:
    write_user(tmp_path / "mine.h5", part=np.array([b"train"] * 50 + [b"val"] * 10))
    cfg = make_cfg("data=hdf5", f"data.source.path={tmp_path / 'mine.h5'}", "data.source.images_key=x",
                   "data.source.labels_key=y", "data.source.split_key=part", tiny=False)
    datamodule, _, _ = build_and_prepare(cfg)
    with pytest.raises(DataError, match="'split' array has no test rows"):
        datamodule.setup()


@pytest.mark.slow
# -- end to end ----------------------------------------------------------------------------------
def test_train_py_downloads_prepares_and_trains(tmp_path: Path, http_server: FileServer,
                                                decals: tuple) -> None:
    _, _, data = decals
    http_server.files["/Galaxy10_DECals.h5"] = data
    run = tmp_path / "run"
    result = in_process(
        main, "data=galaxy10", f"+data.source.urls=[{http_server.url('/Galaxy10_DECals.h5')}]",
        f"+data.source.sha256={sha(data)}", "data.source.n_per_class=20", "data.splits=[100,20,20]",
        "data.batch_size=20", "trainer.max_steps=4", "trainer.val_check_interval=2",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}",
        "callbacks.progress_bar.every_n_steps=1000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "data" / "Galaxy10_DECals.h5").read_bytes() == data
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and sum(map(sum, metrics["test/confusion_matrix"])) == 20
    assert metrics["class_names"][0] == "Merging"


def test_train_py_offline_default_says_where_to_put_the_file(tmp_path: Path,
                                                            http_server: FileServer) -> None:
    result = in_process(main, f"+data.source.urls=[{http_server.url('/gone.h5')}]",
                        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}",
                        cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data: could not download Galaxy10_DECals.h5 (")
    assert "put it at" in last and "Traceback" not in result.stderr
    assert not list((tmp_path / "data").glob("*.part"))
