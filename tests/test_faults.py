"""Nothing lost: runs killed at random moments resume to exactly the uninterrupted result;
killed preparations and downloads recover; concurrent preparations share one file."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.queues
import multiprocessing.sharedctypes
import multiprocessing.synchronize
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from galaxy_lightning.data.prepared import read_prepared
from galaxy_lightning.data.synthetic import SyntheticGalaxies
from galaxy_lightning.train import main

from .cli import Forked, Result, context, forked, in_process
from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
#: A short run that exercises everything a resume must restore: augmentation and mixup (their
#: generator), dropout (torch's RNG), a schedule, weight averaging, BatchNorm statistics, and
#: validation at step counts that are not epoch boundaries (7 batches per epoch, validation
#: every 5 steps).
RUN = [*[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))],
       "model=bn_cnn", "data.augment=[dihedral,rotate,shift]", "data.mixup=0.4", "scheduler=cosine",
       "callbacks=[default,ema]", "callbacks.ema.update_starting_at_step=0",
       "callbacks.bn_statistics.images=64", "trainer.max_steps=30", "trainer.val_check_interval=5",
       "logger=none"]
#: What must be identical between a resumed run and the uninterrupted one.
COMPARED = ("test/acc", "test/loss", "test/ece", "test/confusion_matrix", "test/reliability",
            "val/acc_best", "best_step", "global_step", "history")


def galaxy_train(*args: str, run: Path, data_dir: Path, env: dict[str, str] | None = None) -> Result:
    """``python train.py RUN args`` as a process of its own (it is killed, or signalled), forked
    from a server that has imported the package once (tests/cli.py)."""
    return forked(*RUN, *args, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", cwd=ROOT,
                  env=env)


def results(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: metrics[k] for k in COMPARED} | {k: v for k, v in metrics.items()
                                               if k.startswith("test/acc_class/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("faults")
    done = galaxy_train(run=base / "whole", data_dir=base / "data")
    assert done.returncode == 0, done.stderr[-3000:]
    return results(base / "whole"), base / "data"


def kill_points() -> list[tuple[str, int]]:
    """Random (but reproducible) moments: during training, during a validation, while a
    checkpoint is being written; after the first checkpoint exists (step 5)."""
    rng = random.Random(1234)
    validations = list(range(10, 30, 5))
    return [("train", rng.randrange(6, 30)), ("train", rng.randrange(6, 30)),
            ("validate", rng.choice(validations)), ("validate", rng.choice(validations)),
            ("save", rng.choice(validations)), ("save", rng.choice(validations))]


@pytest.mark.slow
@pytest.mark.parametrize("moment, step", kill_points())
def test_a_run_killed_at_any_moment_resumes_to_the_same_result(reference: tuple, tmp_path: Path,
                                                              moment: str, step: int) -> None:
    expected, data_dir = reference
    killed = galaxy_train("+callbacks.fault._target_=tests.faults.KillAt",
                          f"+callbacks.fault.moment={moment}", f"+callbacks.fault.step={step}",
                          run=tmp_path / "killed", data_dir=data_dir)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert last.is_file()  # intact: a kill while saving leaves the previous one
    resumed = galaxy_train(f"ckpt_path={last}", run=tmp_path / "resumed", data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(tmp_path / "resumed") == expected
    assert (tmp_path / "resumed" / "resumed_from.txt").read_text().strip() == str(last.resolve())


#: Validation (and so last.ckpt) at every epoch's last batch: 7 batches per epoch.
EPOCH_ALIGNED = ["trainer.val_check_interval=7"]


@pytest.fixture(scope="module")
def reference_epoch_aligned(reference: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("aligned") / "whole"
    done = galaxy_train(*EPOCH_ALIGNED, run=run, data_dir=reference[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return results(run)


@pytest.mark.slow
@pytest.mark.parametrize("moment, step", [("train", 15), ("validate", 21)])
def test_a_run_killed_after_an_epoch_end_checkpoint_resumes_to_the_same_result(
        reference: tuple, reference_epoch_aligned: dict, tmp_path: Path, moment: str, step: int) -> None:
    """last.ckpt written by the validation at an epoch's last batch (steps 14, 21 is killed): the
    resumed run must begin the next epoch with its first batch."""
    killed = galaxy_train(*EPOCH_ALIGNED, "+callbacks.fault._target_=tests.faults.KillAt",
                          f"+callbacks.fault.moment={moment}", f"+callbacks.fault.step={step}",
                          run=tmp_path / "killed", data_dir=reference[1])
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed = galaxy_train(*EPOCH_ALIGNED, f"ckpt_path={last}", run=tmp_path / "resumed",
                           data_dir=reference[1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(tmp_path / "resumed") == reference_epoch_aligned


@pytest.mark.slow
# Step 14 is the last batch of an epoch (7 batches per epoch): the stop then lands after the
# epoch is counted as complete, and the resumed run must start the next epoch, not an empty one.
@pytest.mark.parametrize("signal_name, step, code", [("sigint", 13, 130), ("sigterm", 13, 143),
                                                    ("sigterm", 14, 143)])
def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(reference: tuple, tmp_path: Path,
                                                      signal_name: str, step: int, code: int) -> None:
    expected, data_dir = reference
    stopped = galaxy_train("+callbacks.fault._target_=tests.faults.KillAt",
                           f"+callbacks.fault.moment={signal_name}", f"+callbacks.fault.step={step}",
                           "callbacks.run_artifacts.figures=true", run=tmp_path / "stopped", data_dir=data_dir)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    line = next(l for l in stopped.stdout.splitlines() if "resume with:" in l)
    assert f"at step {step}: saved {last}" in line and f"ckpt_path={last}" in line
    assert "Traceback" not in stopped.stderr
    assert (tmp_path / "stopped" / "accuracy_curve.png").is_file()  # the outputs it could write
    resumed = galaxy_train(f"ckpt_path={last}", run=tmp_path / "resumed", data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(tmp_path / "resumed") == expected


@pytest.mark.slow
def test_a_slurm_job_warned_of_its_time_limit_requeues_itself_and_resumes_exactly(
        reference: tuple, tmp_path: Path) -> None:
    """SLURM sends SIGUSR1 before a job's time limit (hydra/launcher=slurm asks for it): the run
    saves last.ckpt between two steps and calls ``scontrol requeue``; the requeued job (same
    command, same run directory, SLURM_RESTART_COUNT=1) resumes from it by itself. scontrol is
    a stand-in that records its arguments."""
    expected, data_dir = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "galaxy", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    job = tmp_path / "job"
    first = galaxy_train("+callbacks.fault._target_=tests.faults.KillAt",
                         "+callbacks.fault.moment=sigusr1", "+callbacks.fault.step=13",
                         run=job, data_dir=data_dir, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued job 4242" in first.stdout
    assert not list(job.glob("**/hpc_ckpt_*.ckpt"))  # Lightning's own mid-step save is off
    again = galaxy_train(run=job, data_dir=data_dir, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert (job / "resumed_from.txt").read_text().strip() == str((job / "checkpoints" / "last.ckpt").resolve())
    assert results(job) == expected


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_newest_run_of_the_task(reference: tuple, tmp_path: Path) -> None:
    expected, data_dir = reference
    logs = tmp_path / "logs"
    killed = forked(*RUN, "+callbacks.fault._target_=tests.faults.KillAt",
                    "+callbacks.fault.moment=train", "+callbacks.fault.step=17",
                    f"paths.data_dir={data_dir}", f"paths.log_dir={logs}", cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    (killed_run,) = (logs / "train" / "runs").iterdir()
    # run directories are named to the microsecond: the next run gets its own at once
    resumed = forked(*RUN, "ckpt_path=last", f"paths.data_dir={data_dir}", f"paths.log_dir={logs}",
                     cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (new_run,) = [r for r in (logs / "train" / "runs").iterdir() if r != killed_run]
    assert (new_run / "resumed_from.txt").read_text().strip() == \
        str((killed_run / "checkpoints" / "last.ckpt").resolve())
    assert results(new_run) == expected


# -- data preparation ----------------------------------------------------------------------------
def _prepare(data_dir: str, n: int | str) -> str:
    return str(SyntheticGalaxies(n_per_class=int(n), image_size=32, seed=5).prepare(data_dir, progress=False))


@pytest.mark.slow
def test_a_killed_preparation_leaves_nothing_corrupt_and_the_next_run_recovers(tmp_path: Path) -> None:
    process = Forked(str(tmp_path), "400", cwd=tmp_path, target=_prepare)
    target = tmp_path / SyntheticGalaxies(n_per_class=400, image_size=32, seed=5).filename
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".{target.name}.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # half-way through writing
    process.send_signal(signal.SIGKILL)
    assert process.wait().returncode == -signal.SIGKILL
    assert not target.exists()  # a half-written file never takes the real name
    assert list(tmp_path.glob(f".{target.name}.*.tmp"))  # what the killed writer left
    path = Path(_prepare(str(tmp_path), 400))
    data = read_prepared(path)
    assert len(data.labels) == 2800 and np.bincount(data.labels).tolist() == [400] * 7
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # cleaned up


def _prepare_counting(data_dir: str, n: int, barrier: multiprocessing.synchronize.Barrier,
                      count: multiprocessing.sharedctypes.Synchronized,
                      results: multiprocessing.queues.Queue) -> None:
    """_prepare, started together with the other process (barrier), counting simulations."""
    real = SyntheticGalaxies._simulate

    def counted(self: SyntheticGalaxies, *args: object) -> None:
        with count.get_lock():
            count.value += 1
        time.sleep(1.0)  # long enough that the other process certainly arrives meanwhile
        real(self, *args)

    SyntheticGalaxies._simulate = counted
    barrier.wait()
    results.put(_prepare(data_dir, n))


@pytest.mark.slow
def test_ctrl_c_during_preparation_is_one_line_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    process = Forked(*TINY, "data.source.n_per_class=3000", f"paths.data_dir={tmp_path / 'data'}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, sigint_default=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "data").glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    result = process.wait(timeout=120)
    out, err = result.stdout, result.stderr
    assert result.returncode == 130, err[-2000:]
    assert "Traceback" not in err + out
    assert err.strip().splitlines()[-1].startswith("interrupted: nothing half-written")
    assert not [p for p in (tmp_path / "data").iterdir() if p.suffix in (".h5", ".tmp")]  # not even a temporary file


@pytest.mark.slow
def test_two_processes_preparing_the_same_file_share_it(tmp_path: Path) -> None:
    barrier, count, results = context.Barrier(2), context.Value("i", 0), context.Queue()
    processes = [context.Process(target=_prepare_counting,
                                 args=(str(tmp_path), 150, barrier, count, results))
                 for _ in range(2)]
    for p in processes:
        p.start()
    paths = [results.get(timeout=300) for _ in processes]
    for p in processes:
        p.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert count.value == 1  # one simulated while the other waited on the lock, then reused it
    assert paths[0] == paths[1]
    data = read_prepared(paths[0])
    again = read_prepared(Path(_prepare(str(tmp_path), 150)))
    assert np.array_equal(data.images, again.images) and len(data.labels) == 1050
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        [Path(paths[0]).name]


def test_an_unreadable_last_checkpoint_names_the_newest_good_one(tmp_path: Path, make_cfg,  # noqa: ANN001
                                                                 tiny_run: tuple) -> None:
    from galaxy_lightning.errors import CheckpointError
    from galaxy_lightning.train import train

    checkpoints = tmp_path / "checkpoints"  # a copy of the session's trained run's
    shutil.copytree(tiny_run[0].parent, checkpoints)
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    os.utime(last, (time.time() + 10, time.time() + 10))  # and the newest
    with pytest.raises(CheckpointError, match=r"last.ckpt: not a readable checkpoint .* the newest "
                                              r"readable checkpoint there is .*best-step00020"):
        train(make_cfg(f"ckpt_path={last}", run="resume"))


# -- one line for every bad input ----------------------------------------------------------------
def cli(*args: str, tmp_path: Path, data_dir: Path | None = None) -> Result:
    """``train.py TINY args`` through the command line's boundary, in this process."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return in_process(main, *TINY, *args, f"paths.data_dir={data_dir or tmp_path / 'data'}",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)


def one_line(result: Result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_checkpoints_that_cannot_be_resumed_are_refused_in_one_line(tmp_path: Path,
                                                                     tiny_run: tuple) -> None:
    one_line(cli(f"ckpt_path={tmp_path / 'nope.ckpt'}", tmp_path=tmp_path), "nope.ckpt: checkpoint not found")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    one_line(cli(f"ckpt_path={tmp_path / 'junk.ckpt'}", tmp_path=tmp_path),
             "junk.ckpt: not a readable checkpoint")
    # refused before any data is touched, and nothing claims a resume that did not happen
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "resumed_from.txt").exists()
    last = tiny_run[0].parent / "last.ckpt"  # the session's trained run (conftest.py)
    assert last.is_file()
    one_line(cli(f"ckpt_path={last}", "model.width=2", tmp_path=tmp_path / "b"),
             "was trained with another model", "use the run's own config")
    assert not (tmp_path / "b" / "data").exists()  # a model mismatch needs no data to be found
    one_line(cli(f"ckpt_path={last}", "data.source.image_size=48", tmp_path=tmp_path / "c",
                 data_dir=tiny_run[2]), "was trained with another data")
    one_line(cli("ckpt_path=last", f"paths.log_dir={tmp_path / 'empty'}", tmp_path=tmp_path / "d"),
             "ckpt_path=last: no last.ckpt under")


def test_unusable_machines_and_directories_are_refused_in_one_line(tmp_path: Path) -> None:
    one_line(cli("trainer=gpu", "trainer.accelerator=gpu", tmp_path=tmp_path),  # (TINY says cpu)
             "trainer: ", "No supported gpu backend found", "trainer=cpu")
    cores = len(os.sched_getaffinity(0))
    one_line(cli("trainer=ddp_sim", f"trainer.devices={cores + 1}", tmp_path=tmp_path),
             f"trainer.devices={cores + 1} CPU processes but this machine has {cores} cores")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line(cli(tmp_path=tmp_path, data_dir=blocker / "data"), "cannot write in", "paths.data_dir")
    result = in_process(main, *TINY, f"paths.data_dir={tmp_path / 'data'}",
                        f"paths.log_dir={blocker / 'logs'}", cwd=tmp_path)
    one_line(result, "cannot create the run directory", str(blocker), "paths.log_dir")


def test_a_full_disk_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import h5py

    from galaxy_lightning.checkpoints import AtomicCheckpointIO
    from galaxy_lightning.errors import CheckpointError, DataError

    real = h5py.Dataset.__setitem__

    def full(self, key, value):  # noqa: ANN001, ANN202
        if self.name == "/images":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(DataError, match=r"cannot write .*No space left on device.*paths.data_dir"):
        SyntheticGalaxies(n_per_class=5, image_size=16).prepare(tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    monkeypatch.undo()

    # The disk fills up half-way through a checkpoint: the file's write fails as it would
    # (torch's zip writer then raises a RuntimeError whose context is the OSError).
    import galaxy_lightning.files as files  # where checkpoints are written from

    monkeypatch.setattr(files, "open", _filling_disk(after=4096), raising=False)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "last.ckpt").write_bytes(b"the previous checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last.ckpt \(No space left"):
        AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(100_000)}, tmp_path / "ckpts" / "last.ckpt")
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["last.ckpt"]
    assert (tmp_path / "ckpts" / "last.ckpt").read_bytes() == b"the previous checkpoint"


def _filling_disk(after: int):  # noqa: ANN202
    """``open`` whose files refuse to grow beyond ``after`` bytes with ENOSPC, as a full disk."""
    import builtins
    import errno
    import io

    class Full(io.FileIO):
        def write(self, data):  # noqa: ANN001, ANN202
            if self.tell() + len(data) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def fake_open(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "w" in mode or "a" in mode:
            return Full(path, mode.replace("b", "") or "w")
        return builtins.open(path, mode, *args, **kwargs)

    return fake_open


def test_a_full_disk_during_a_download_is_one_line_and_resumable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_server) -> None:  # noqa: ANN001
    import galaxy_lightning.data.download as download_module
    import hashlib

    from galaxy_lightning.data.download import download
    from galaxy_lightning.errors import DataError

    payload = os.urandom(3 * download_module.CHUNK)
    http_server.files["/big.bin"] = payload
    target = tmp_path / "big.bin"
    full_at = int(1.5 * download_module.CHUNK)  # one block arrives, the second finds no room
    monkeypatch.setattr(download_module, "open", _filling_disk(after=full_at), raising=False)
    with pytest.raises(DataError, match=r"cannot write .*big.bin.part \(No space left on device\); "
                                        r"free space"):
        download([http_server.url("/big.bin")], target, hashlib.sha256(payload).hexdigest(), progress=False)
    assert len(http_server.requests) == 1  # not retried, and no other mirror tried: it is local
    assert not target.exists() and (tmp_path / "big.bin.part").stat().st_size == download_module.CHUNK
    monkeypatch.undo()
    download([http_server.url("/big.bin")], target, hashlib.sha256(payload).hexdigest(), progress=False)
    assert target.read_bytes() == payload
    assert http_server.requests[-1][1] == f"bytes={download_module.CHUNK}-"  # resumed


def test_data_of_a_single_class_is_refused(tmp_path: Path, make_cfg) -> None:  # noqa: ANN001
    import h5py

    from galaxy_lightning.errors import DataError
    from galaxy_lightning.train import build, prepare_data

    with h5py.File(tmp_path / "one.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((30, 16, 16, 3), np.uint8))
        f.create_dataset("labels", data=np.zeros(30, np.int64))
        f.attrs["class_names"] = '["spiral", "elliptical"]'
    datamodule, _ = build(make_cfg("data=hdf5", f"data.source.path={tmp_path / 'one.h5'}",
                                   tiny=False))
    with pytest.raises(DataError, match=r"all 30 images are of one class \(spiral\)"):
        prepare_data(datamodule)


@pytest.mark.slow
def test_runs_print_no_third_party_banners(tmp_path: Path) -> None:
    """The process boundary of ``python train.py`` itself (every other run of this file is forked
    or in-process): what a user's terminal shows, import-time warnings included."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "logger=none",
                             f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "Tip:" not in out and "LeafSpec" not in out and "does not have many workers" not in out
    assert "test accuracy" in out  # what matters is still there


def test_a_diverging_run_stops_at_once_in_one_line_and_keeps_its_last_good_checkpoint(
        tmp_path: Path) -> None:
    # NaN weights after step 12: the step-13 loss is NaN; last.ckpt (step 10) was written before
    result = cli("logger=none", "+callbacks.fault._target_=tests.faults.NanAt",
                 "+callbacks.fault.step=12", tmp_path=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    line = one_line(result, "training diverged: the loss became nan by step 13",
                    "lower optimizer.lr (now 0.001)", f"the last checkpoint, written before it: {last}")
    assert "momentum" not in line  # Adam has none to lower
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing after a NaN is reported


def test_an_exploding_loss_is_flagged_and_an_untrainable_momentum_refused(tmp_path: Path,
                                                                          tiny_run: tuple) -> None:
    exploding = cli("logger=none", "optimizer.lr=1e6", tmp_path=tmp_path / "a")
    assert exploding.returncode == 0, exploding.stderr[-2000:]  # finite: it runs to its end
    warning = next(l for l in exploding.stdout.splitlines() if "the training loss is exploding" in l)
    assert "lower optimizer.lr (now 1000000.0)" in warning
    metrics = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())
    assert metrics["train/exploding_at_step"] >= 1 and metrics["train/loss_peak"] > 100 * np.log(7)
    normal = tiny_run[1]  # the session's tiny run, at the default rate: not flagged
    assert normal["train/exploding_at_step"] is None and normal["train/loss_peak"] < np.log(7) + 1
    one_line(cli("optimizer=sgd", "optimizer.momentum=2", tmp_path=tmp_path / "b"),
             "optimizer.momentum=2 must be in [0, 1)")
    assert not (tmp_path / "b" / "data").exists()  # refused before any data is touched


def test_a_run_resumed_into_a_new_directory_keeps_the_earlier_best(tmp_path: Path) -> None:
    """Lightning restores only the best path across directories, not its score, so the first
    validation after a resume became the 'best' even when worse (found by the streamed kill
    test, where validation accuracy ties)."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    from galaxy_lightning.callbacks import BestCheckpoint

    old = tmp_path / "old"
    old.mkdir()
    (old / "best.ckpt").write_bytes(b"weights")
    state = {"dirpath": str(old), "best_model_path": str(old / "best.ckpt"),
             "best_model_score": torch.tensor(0.5)}
    options = dict(dirpath=str(tmp_path / "new"), monitor="val/acc", mode="max", save_top_k=1)
    ours = BestCheckpoint(**options)
    ours.load_state_dict(dict(state))
    assert float(ours.best_model_score) == 0.5 and list(ours.best_k_models) == [str(old / "best.ckpt")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ModelCheckpoint(**options)
        plain.load_state_dict(dict(state))
    assert plain.best_model_score is None  # what Lightning alone keeps
    # filed under ModelCheckpoint's key, so checkpoints of earlier versions restore into it
    assert ours.state_key == plain.state_key
