"""Preparation and training at survey scale: a preparation killed half-way resumes where it
stopped, parts prepared by separate processes combine into the file one process would write, and
a streamed run holds far less memory than its data file."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from galaxy_lightning.data import catalog as catalog_module
from galaxy_lightning.data.prepared import read_info, read_prepared
from galaxy_lightning.errors import ConfigError, DataError
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.prepare import main as galaxy_prepare
from galaxy_lightning.prepare import prepare

from .helpers import write_prepared
from .test_catalog import write_fits_set

N = 30


@pytest.fixture(scope="module")
def cutouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 FITS cubes with a catalog, one of them unreadable (skipped and counted)."""
    catalog = write_fits_set(tmp_path_factory.mktemp("survey") / "cutouts", "cube", n=N)
    (catalog.parent / "obj5.fits").write_bytes(b"not a FITS file")
    return catalog


def overrides(catalog: Path, data_dir: Path) -> list[str]:
    return ["data=catalog", f"data.source.catalog={catalog}",
            "data.source.image_columns=['{objid}.fits']", "data.source.label_column=label",
            "data.source.id_column=objid", "data.source.ra_column=ra",
            "data.source.dec_column=dec", "data.source.crop=32", "data.source.workers=0",
            f"paths.data_dir={data_dir}"]


def assert_same_file(a: Path, b: Path) -> None:
    one, other = read_prepared(a), read_prepared(b)
    assert np.array_equal(one.images, other.images) and np.array_equal(one.labels, other.labels)
    assert sorted(one.columns) == sorted(other.columns) == ["dec", "id", "ra", "source_index"]
    for name in one.columns:
        assert np.array_equal(one.columns[name], other.columns[name]), name
    assert one.info.spec == other.info.spec
    assert one.info.provenance == other.info.provenance


@pytest.fixture(scope="module")
def whole(cutouts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file one uninterrupted process prepares."""
    return prepare(overrides(cutouts, tmp_path_factory.mktemp("whole")), progress=False)


def test_parts_combine_into_the_file_one_process_writes(
        cutouts: Path, whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(catalog_module, "WRITE_BLOCK", 4)  # several blocks per part
    data_dir = tmp_path / "data"
    args = overrides(cutouts, data_dir)
    target = data_dir / whole.name
    galaxy_prepare(["--part", "0/3", *args])
    assert "images of 32x32x3" in capsys.readouterr().out
    galaxy_prepare(["--part", "2/3", *args])
    with pytest.raises(DataError, match=r"2 of 3 part files are prepared; parts 1 are missing or "
                                        r"unfinished: run galaxy-prepare --part K/3"):
        prepare(args, progress=False)
    assert not target.exists()
    galaxy_prepare(["--part", "1/3", *args])
    parts = [next(data_dir.glob(f"*.part-0000{k}-of-00003.h5")) for k in range(3)]
    assert sum(read_info(p).num_images for p in parts) == N - 1  # obj5 skipped, in part 0
    assert prepare(args, progress=False) == target  # combines the three
    with h5py.File(target) as f:
        assert f["images"].is_virtual and len(f["images"].virtual_sources()) == 3
    assert target.stat().st_size < parts[0].stat().st_size  # the pixels stayed in the parts
    assert_same_file(whole, target)
    assert read_info(target).provenance["counts"]["unreadable"] == 1

    galaxy_prepare(["--part", "1/3", *args, "data.source.crop=30"])  # another crop's part ...
    assert len(list(data_dir.glob("*.part-00001-of-00003.h5"))) == 2  # ... beside, not over it
    assert_same_file(whole, target)
    moved = tmp_path / "moved"  # the folder moves as a whole (the parts are named relatively)
    data_dir.rename(moved)
    assert_same_file(whole, moved / whole.name)
    with h5py.File(moved / whole.name) as f:
        ours = f["images"].virtual_sources()[1].file_name  # (not the other crop's part 1)
    (moved / ours).unlink()
    with pytest.raises(DataError, match=r"its images are in the part file .*part-00001-of-00003"
                                        r"\.h5, which is missing; keep the part files beside it"):
        read_info(moved / whole.name)

    with pytest.raises(SystemExit) as exit_:
        galaxy_prepare(["--part", "3/3", *args])
    assert exit_.value.code == 2
    assert "--part 3/3: K must be 0 to 2" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prepares in one process only; parts are for "
                                          "data=catalog"):
        prepare(["data=synthetic", f"paths.data_dir={tmp_path}"], part="0/2", progress=False)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from galaxy_lightning.data import catalog
    from galaxy_lightning.data.prepared import PreparedWriter
    from galaxy_lightning.prepare import prepare

    catalog.WRITE_BLOCK = 4
    checkpoint = PreparedWriter.checkpoint

    def killed_after_12(self, state):  # a kill right after the third resume point
        checkpoint(self, state)
        if state["done"] >= 12:
            os.kill(os.getpid(), signal.SIGKILL)

    PreparedWriter.checkpoint = killed_after_12
    prepare(sys.argv[1:], progress=False)
""")


@pytest.mark.slow
def test_a_killed_preparation_resumes_where_it_stopped(
        cutouts: Path, whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # reader processes too: a parent killed outright must not leave them holding the file
    args = [*overrides(cutouts, tmp_path), "data.source.workers=2"]
    killed = subprocess.run([sys.executable, "-c", KILLED, *args], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / whole.name).exists()
    assert (tmp_path / f".{whole.name}.partial").is_file()

    monkeypatch.setattr(catalog_module, "WRITE_BLOCK", 4)
    read: list[int] = []
    real = catalog_module.read_images

    def counted(reader, jobs, workers=0, chunk=64):  # type: ignore[no-untyped-def]
        read.append(len(jobs))
        return real(reader, jobs, workers, chunk)

    monkeypatch.setattr(catalog_module, "read_images", counted)
    caplog.set_level(logging.INFO, "galaxy_lightning.data")
    path = prepare(args, progress=True)
    assert read == [N - 13]  # 12 images + obj5 (unreadable) were done before the kill
    assert "resuming catalog.prepared.h5 at image 13 of 30" in caplog.text
    assert_same_file(whole, path)
    assert not (tmp_path / f".{whole.name}.partial").exists()


MEMORY = textwrap.dedent("""
    import sys
    from pathlib import Path
    from galaxy_lightning.data.datamodule import GalaxyDataModule

    class Prepared:  # the file as it is
        def prepare(self, data_dir, progress=True):
            return Path(sys.argv[1])

    dm = GalaxyDataModule(Prepared(), data_dir=".", batch_size=240, splits=[0.9, 0.05, 0.05],
                          in_memory=sys.argv[2] == "memory", stream_workers=1)
    dm.prepare_data()
    dm.setup()
    seen = sum(len(batch[0]) for batch in dm.train_dataloader())
    print(seen, flush=True)
    dm.teardown("fit")
""")


#: Runs its arguments as a process and prints its exit code and peak resident memory (kB).
PEAK = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:]); "
        "_, status, usage = os.wait4(child.pid, 0); "
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


@pytest.mark.slow
def test_a_streamed_epoch_holds_far_less_memory_than_its_file(tmp_path: Path) -> None:
    """The peak resident memory of a process that reads a whole training epoch streamed, as the
    kernel accounts it from outside (the largest of the child and its reader process), stays
    well below the file's size; loading the images would need all of it."""
    n, size = 12_000, 96  # 332 MB of pixels
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8)
    path = tmp_path / "large.prepared.h5"
    write_prepared(path, np.tile(tile, (n // 100, 1, 1, 1)), np.arange(n) % 3,
                   InputSpec(class_names=("a", "b", "c"), channels=3, image_size=size),
                   {"source": "test"})
    file_size = path.stat().st_size

    def peak_of(mode: str) -> tuple[int, int]:
        """(images read, the child's peak resident memory in bytes, as the kernel accounts it to
        the small process that waits for it: the pytest process, forked, would count its own
        pages as the child's until the child's exec)."""
        done = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-c", MEMORY,
                               str(path), mode], capture_output=True, text=True, timeout=300)
        *_, seen, code, peak = done.stdout.split()
        assert done.returncode == 0 and code == "0", done.stderr
        return int(seen), int(peak) * 1024

    del tile
    seen, streamed = peak_of("stream")
    assert seen == int(0.9 * n)  # the whole training split was read (45 batches of 240)
    _, in_memory = peak_of("memory")
    # here: 447 MB streamed (the imports: ~420 MB), 1,106 MB in memory, for a 333 MB file
    assert in_memory - streamed > 0.8 * file_size, (streamed, in_memory, file_size)


def test_bad_input_half_way_leaves_nothing_and_an_unreadable_part_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_module, "WRITE_BLOCK", 4)
    catalog = write_fits_set(tmp_path / "cutouts", "cube", n=12)
    good = (catalog.parent / "obj9.fits").read_bytes()
    (catalog.parent / "obj9.fits").write_bytes(b"broken")
    args = [*overrides(catalog, tmp_path / "data"), "data.source.on_error=error"]
    with pytest.raises(DataError, match="obj9.fits: not a readable FITS file"):
        prepare(args, progress=False)
    # a refusal leaves nothing half-written (a kill or Ctrl-C keeps the partial file to resume)
    assert not [p for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock")]
    (catalog.parent / "obj9.fits").write_bytes(good)
    assert read_info(prepare(args, progress=False)).num_images == 12

    for i in range(4):  # part 0 of 3: objects 0-3, none readable
        (catalog.parent / f"obj{i}.fits").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"none of its 4 images could be read; fix the files .*"
                                        r"or prepare in fewer parts"):
        prepare(overrides(catalog, tmp_path / "parts"), part="0/3", progress=False)
