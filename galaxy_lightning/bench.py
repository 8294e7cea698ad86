"""The project's benchmark: ``python -m galaxy_lightning.bench`` (or ``make bench``).

Runs side by side, on this machine, in one invocation:

- the course tutorial's own training loop as the course wrote it (the baseline): all images as
  float32 NHWC, transposed to NCHW views, random batches of 200, Adam, training and validation
  accuracy every 100 iterations, the best parameters kept;
- the project's training through the real ``train.py`` (Lightning Trainer, validation every 100
  steps, checkpoints, TensorBoard) with the tutorial config, in the default float32 mode and in
  the fast mode (``perf=fast``);
- the machine's limit for the same model: a bare loop of the project's batch path and Adam,
  without the Trainer, in float32 and in fast mode;

each in its own process; then each model of the ``model`` group in the recommended recipe
(``experiment=recommended``: batch 128, its augmentation) in float32 and in fast mode;
the preparation of a catalog of generated FITS cutouts (``data=catalog``: 20,000 by default,
and a quarter of them, to show that peak memory does not grow with the catalog), with one and
with two reading processes; a shortened recommended run under Lightning's simple profiler,
grouped into phases (training steps, batches, EMA, BatchNorm statistics, validation, checkpoints,
calibration, the TTA test, figures) and projected to the recipe's full length;
and prints the steady-state ms per step, images per second, peak
resident memory, time from process start to the end of the first training step, and the ratios
to the baseline. It also times the synthetic simulator and the preparation of the Galaxy10
DECaLS subset from a full-size file of the real layout (17,736 x 256x256x3, per-image gzip chunks;
generated once into ``<data-dir>/bench/`` and reused).

Figures are printed and saved as JSON; nothing here asserts a time. The driver itself imports
no torch and holds no data: peak RSS survives ``execve`` on Linux, so a worker started from a
large parent would report the parent's size as its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from typing import Any

from galaxy_lightning import perf
from galaxy_lightning.config import CONFIG_PACKAGE, length_steps
from galaxy_lightning.data.galaxy10 import DECALS_COUNTS


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers (run in their own processes) ----------------------------------------------------------
def tutorial_loop(data_path: Path, steps: int, out: Path, eval_every: int = 100, seed: int = 0) -> None:
    """The course's loop: float NHWC arrays in memory, random batches, Adam, keep the best."""
    import torch
    import torch.nn.functional as F

    from galaxy_lightning.data.datamodule import resolve_split_sizes
    from galaxy_lightning.data.prepared import read_prepared
    from galaxy_lightning.models import TutorialCNN

    torch.manual_seed(seed)
    data = read_prepared(data_path)
    sizes = resolve_split_sizes([10000, 1600, 1000], len(data.labels), data_path)
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))
    x = torch.from_numpy(data.images).float() / 256  # float32 NHWC, as the notebook held them
    y = torch.from_numpy(data.labels)
    train_idx, val_idx = order[:sizes[0]], order[sizes[0]:sizes[0] + sizes[1]]
    x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    del x
    model = TutorialCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def accuracy(images: "torch.Tensor", labels: "torch.Tensor") -> float:
        with torch.no_grad():
            return float((model(images.permute(0, 3, 1, 2)).argmax(1) == labels).float().mean())

    best, best_state, step_end = -1.0, None, []
    for it in range(1, steps + 1):
        idx = torch.randint(0, len(y_train), (200,))
        loss = F.cross_entropy(model(x_train[idx].permute(0, 3, 1, 2)), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % eval_every == 0:
            accuracy(x_train[:len(y_val)], y_train[:len(y_val)])
            val = accuracy(x_val, y_val)
            if val > best:
                best, best_state = val, copy.deepcopy(model.state_dict())  # noqa: F841 (the course kept them: part of its cost)
        step_end.append(time.time())
    _write_loop_result(out, step_end, val_acc_best=best)


def _write_loop_result(out: Path, step_end: list[float], **extra: Any) -> None:
    """A hand-written loop's figures (batches of 200): the steady step time after 20 warm-up
    steps, the end of the first step (the driver subtracts its start), peak memory."""
    warm = min(20, len(step_end) - 1)
    steady = (step_end[-1] - step_end[warm]) / max(1, len(step_end) - 1 - warm)
    out.write_text(json.dumps({"steps": len(step_end), "first_step_end": step_end[0],
                               "ms_per_step": 1e3 * steady, "images_per_s": 200 / steady,
                               "peak_rss_mb": _peak_rss_mb(), **extra}))


def bare_loop(data_path: Path, steps: int, out: Path, fast: bool, seed: int = 0) -> None:
    """The machine's limit for the tutorial CNN, the step ``train.py`` approaches: the project's
    batch path (a uint8 gather, one conversion to a channels-last float batch) and Adam, with no
    Trainer, validation, checkpoints or logging; ``fast``: ``perf=fast``'s precision for this CPU
    and ``torch.compile``. What ``train.py`` costs over it is the Trainer's."""
    import torch
    import torch.nn.functional as F

    from galaxy_lightning.data.prepared import read_prepared
    from galaxy_lightning.models import TutorialCNN

    perf.tune_malloc()
    if fast:
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(seed)
    data = read_prepared(data_path)
    images = torch.from_numpy(data.images[:10000])  # uint8 NHWC, as the DataModule keeps them
    labels = torch.from_numpy(data.labels[:10000]).long()
    model = TutorialCNN().to(memory_format=torch.channels_last)
    forward = torch.compile(model) if fast else model
    bf16 = fast and perf.fast_precision("cpu") == "bf16-mixed"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step_end = []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (200,))
        x = images[idx].permute(0, 3, 1, 2).float().div_(255)  # NCHW view of NHWC: channels-last
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.detach().item()  # the Trainer reads the loss every step too
        step_end.append(time.time())
    _write_loop_result(out, step_end, precision="bf16-mixed" if bf16 else "32-true")


def simulate_worker(data_dir: Path, out: Path) -> None:
    """Time the simulator on 700 images, then make sure the 12,600-image set is prepared."""
    from galaxy_lightning.data.synthetic import SyntheticGalaxies, simulate

    t0 = time.perf_counter()
    simulate(100, 96, seed=12345)
    per_image = (time.perf_counter() - t0) / 700
    path = SyntheticGalaxies().prepare(data_dir, progress=False)
    out.write_text(json.dumps({"ms_per_image": 1e3 * per_image, "s_for_12600": 12600 * per_image,
                               "path": str(path)}))


def fullsize_worker(path: Path, synthetic: Path, out: Path) -> None:
    out.write_text(json.dumps({"seconds": write_fullsize_decals(path, synthetic)}))


def prepare_worker(source: Path, data_dir: Path, out: Path) -> None:
    """Prepare the tutorial subset from ``source`` (no checksum: a look-alike file)."""
    from galaxy_lightning.data.galaxy10 import Galaxy10DECaLS

    t0 = time.perf_counter()
    path = Galaxy10DECaLS(filename=str(source), urls=[], sha256=None, download=False,
                          prepared_name="bench_prepared.h5").prepare(data_dir, progress=False)
    elapsed = time.perf_counter() - t0
    out.write_text(json.dumps({"seconds": elapsed, "peak_rss_mb": _peak_rss_mb(), "path": str(path)}))


# -- a catalog of FITS cutouts -------------------------------------------------------------------
def write_fits_catalog(folder: Path, n: int, size: int = 64, seed: int = 0) -> float:
    """``n`` single-band FITS cutouts (float32 fluxes: an exponential or de Vaucouleurs profile on
    a noisy sky, some NaN pixels) and ``catalog.csv`` (objid, file, label); returns seconds."""
    import numpy as np
    from astropy.io import fits

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    lines = ["objid,file,label"]
    for i in range(n):
        q = rng.uniform(0.3, 1.0)
        r = np.hypot(x, y / q)
        label = int(rng.integers(0, 2))
        profile = np.exp(-r / rng.uniform(3, 8)) if label else np.exp(-7.67 * ((r / rng.uniform(3, 8)) ** 0.25 - 1)) / 2000
        flux = (rng.uniform(200, 2000) * profile + rng.normal(0, 3, (size, size))).astype(np.float32)
        flux[rng.integers(0, size), :rng.integers(0, 6)] = np.nan
        name = f"cut{i // 1000:02d}/obj{i:06d}.fits"
        (folder / name).parent.mkdir(exist_ok=True)
        fits.PrimaryHDU(flux).writeto(folder / name, overwrite=True)
        lines.append(f"obj{i:06d},{name},{'disk' if label else 'spheroid'}")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return time.perf_counter() - t0


def fits_prepare_worker(catalog: Path, data_dir: Path, workers: int, rows: int, out: Path) -> None:
    """Prepare the first ``rows`` rows of the FITS catalog; time and peak memory."""
    from galaxy_lightning.data.catalog import CatalogSource

    images = catalog.parent
    if rows < sum(1 for _ in open(catalog)) - 1:
        subset = data_dir / f"catalog_{rows}.csv"
        with open(catalog) as src, open(subset, "w") as dst:
            for i, line in enumerate(src):
                if i > rows:
                    break
                dst.write(line)
        catalog = subset
    t0 = time.perf_counter()
    source = CatalogSource(str(catalog), ["file"], image_root=str(images), label_column="label",
                           id_column="objid", crop=48, workers=workers,
                           prepared_name=f"fits_{rows}_{workers}.h5")
    path = source.prepare(data_dir, progress=False)
    elapsed = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.write_text(json.dumps({"seconds": elapsed, "images": rows, "peak_rss_mb": _peak_rss_mb(),
                               "peak_reader_rss_mb": children, "path": str(path)}))


def _fits_runs(args: argparse.Namespace, me: list[str], data_dir: Path, out_dir: Path,
               report: dict[str, Any]) -> None:
    folder = data_dir / "bench" / "fits"
    n = args.fits_images
    if not (folder / "catalog.csv").is_file() or \
            sum(1 for _ in open(folder / "catalog.csv")) - 1 < n:
        print(f"\nwriting {n:,} FITS cutouts once (reused later) ...", flush=True)
        report["fits_write_s"] = write_fits_catalog(folder, n)
        print(f"  {report['fits_write_s']:.0f} s", flush=True)
    print("\ncatalog of FITS cutouts -> prepared file (64x64 fluxes, NaN filling, asinh stretch, "
          "crop 48):")
    print(f"{'images':>8s} {'readers':>8s} {'seconds':>8s} {'img/s':>7s} {'driver MB':>10s} "
          f"{'reader MB':>10s}")
    runs = []
    for rows, workers in ((n // 4, 2), (n, 1), (n, 2)):
        for old in (data_dir / "bench").glob(f"fits_{rows}_{workers}.h5"):
            old.unlink()
        res = out_dir / f"fits_{rows}_{workers}.json"
        r = _timed_process([*me, "--worker", "fits", "--source", str(folder / "catalog.csv"),
                            "--rows", str(rows), "--workers", str(workers), "--result", str(res)], res)
        r["workers"] = workers
        runs.append(r)
        print(f"{rows:8,d} {workers:8d} {r['seconds']:8.1f} {rows / r['seconds']:7.0f} "
              f"{r['peak_rss_mb']:10.0f} {r['peak_reader_rss_mb']:10.0f}", flush=True)
    report["fits_prepare"] = runs


# -- the full-size look-alike of Galaxy10_DECals.h5 -----------------------------------------------
def write_fullsize_decals(path: Path, synthetic: Path, duplicates: int = 59, seed: int = 0) -> float:
    """17,736 images of 256x256x3 with the real keys, dtypes and class counts; returns seconds.

    Pixels: simulated 96 px galaxies upsampled to 256 px plus noise (compresses about as badly
    as the real JPEG-derived cutouts). Chunks of one image, gzip level 4 (our assumption of
    "like the original": the real file's chunking is not documented).
    """
    import h5py
    import numpy as np
    import torch
    import torch.nn.functional as F

    from galaxy_lightning.data.prepared import read_prepared

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    src = read_prepared(synthetic).images
    labels = np.concatenate([np.full(n, k, dtype=np.uint8) for k, n in enumerate(DECALS_COUNTS)])
    rng.shuffle(labels)
    n = len(labels)
    ra, dec = rng.uniform(0, 360, n), rng.uniform(-30, 80, n)
    pool = np.flatnonzero(np.isin(labels, [2, 7]))  # classes with images to spare
    pairs = rng.choice(pool, 2 * duplicates, replace=False).reshape(2, -1)
    ra[pairs[1]], dec[pairs[1]] = ra[pairs[0]], dec[pairs[0]]
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (n, 256, 256, 3), dtype=np.uint8, chunks=(1, 256, 256, 3),
                                  compression="gzip", compression_opts=4)
        block = 256
        for start in range(0, n, block):
            rows = np.arange(start, min(start + block, n))
            small = torch.from_numpy(src[rows % len(src)]).permute(0, 3, 1, 2).float()
            big = F.interpolate(small, size=(256, 256), mode="bilinear", align_corners=False)
            big += torch.randn(big.shape, generator=torch.Generator().manual_seed(start)) * 6
            images[start:start + len(rows)] = big.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        f.create_dataset("ans", data=labels)
        f.create_dataset("ra", data=ra)
        f.create_dataset("dec", data=dec)
        z = rng.uniform(0, 0.3, n)
        z[rng.random(n) < 0.1] = np.nan
        f.create_dataset("redshift", data=z)
        f.create_dataset("pxscale", data=np.full(n, 0.262))
    os.replace(tmp, path)
    return time.perf_counter() - t0


# -- the driver --------------------------------------------------------------------------------------
def _machine() -> str:
    return (f"{perf.cpu_name()}, {os.cpu_count()} cores, torch {version('torch')}, "
            f"Python {platform.python_version()}")


def _timed_process(cmd: list[str], result: Path) -> dict[str, Any]:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.time() - start
    if "first_step_end" in out:
        out["first_step_s"] = out["first_step_end"] - start
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="galaxy_lightning benchmark (prints figures)")
    parser.add_argument("--steps", type=int, default=1000,
                        help="training steps of each tutorial-loop and train.py run (1,000)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternated rounds of the tutorial loop, float32 and fast mode "
                             "and the bare loops (2)")
    parser.add_argument("--model-steps", type=int, default=300,
                        help="training steps of each per-model run (300)")
    parser.add_argument("--data-dir", default="data", help="where data sets are cached (./data)")
    parser.add_argument("--out-dir", default=str(Path("logs") / "bench"),
                        help="results and runs (./logs/bench)")
    parser.add_argument("--skip-prepare", action="store_true", help="skip the Galaxy10 preparation timing")
    parser.add_argument("--skip-models", action="store_true", help="skip the per-model timings")
    parser.add_argument("--only-models", action="store_true",
                        help="only the per-model timings (after the simulator)")
    parser.add_argument("--only-fits", action="store_true",
                        help="only the preparation of a catalog of FITS cutouts")
    parser.add_argument("--fits-images", type=int, default=20000,
                        help="FITS cutouts in the catalog benchmark (20,000)")
    parser.add_argument("--only-stream", action="store_true",
                        help="only streamed against in-memory training (a set larger than memory)")
    parser.add_argument("--stream-images", type=int, default=200000,
                        help="simulated 96 px galaxies in the streamed set (200,000: 5.5 GB)")
    parser.add_argument("--stream-steps", type=int, default=300,
                        help="training steps of each streamed/in-memory run (300)")
    parser.add_argument("--only-recipe", action="store_true",
                        help="only the profile of a shortened recommended run: where its time "
                             "goes, and its projected minutes at full length")
    parser.add_argument("--recipe-steps", type=int, default=800,
                        help="training steps of the profiled recommended run (800)")
    parser.add_argument("--worker", choices=["tutorial", "bare", "bare-fast", "prepare", "simulate",
                                             "fullsize", "fits"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds {args.rounds} --steps {args.steps}: both must be at least 1")
    data_dir = Path(args.data_dir).resolve()
    if args.worker == "tutorial":
        return tutorial_loop(Path(args.source), args.steps, Path(args.result))
    if args.worker in ("bare", "bare-fast"):
        return bare_loop(Path(args.source), args.steps, Path(args.result), args.worker == "bare-fast")
    if args.worker == "prepare":
        return prepare_worker(Path(args.source), data_dir / "bench", Path(args.result))
    if args.worker == "simulate":
        return simulate_worker(data_dir, Path(args.result))
    if args.worker == "fullsize":
        return fullsize_worker(data_dir / "bench" / "Galaxy10_DECals_fullsize.h5", Path(args.source),
                               Path(args.result))
    if args.worker == "fits":
        return fits_prepare_worker(Path(args.source), data_dir / "bench", args.workers, args.rows,
                                   Path(args.result))

    me = [sys.executable, "-m", "galaxy_lightning.bench", "--data-dir", str(data_dir)]
    out_dir = Path(args.out_dir).resolve() / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": _machine(), "steps": args.steps, "rounds": args.rounds}
    print(f"machine: {report['machine']}\n", flush=True)

    if args.only_stream:
        _stream_runs(args, data_dir, out_dir, report)
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
        print(f"\nresults: {out_dir / 'bench.json'}")
        return
    if args.only_recipe:
        _recipe_profile(args, data_dir, out_dir, report)
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
        print(f"\nresults: {out_dir / 'bench.json'}")
        return
    if args.only_fits:
        _fits_runs(args, me, data_dir, out_dir, report)
        (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
        print(f"\nresults: {out_dir / 'bench.json'}")
        return

    # 1. the simulator
    res = out_dir / "simulate.json"
    sim = report["simulator"] = _timed_process([*me, "--worker", "simulate", "--result", str(res)], res)
    synthetic = Path(sim["path"])
    print(f"simulator: {sim['ms_per_image']:.2f} ms/image -> {sim['s_for_12600']:.1f} s for the "
          "12,600-image set (one core)", flush=True)

    if not args.only_models:
        _tutorial_runs(args, me, synthetic, data_dir, out_dir, report)
    if not args.skip_models:
        _model_runs(args, data_dir, out_dir, report)
    if not args.only_models:
        _recipe_profile(args, data_dir, out_dir, report)
    if not args.only_models and not args.skip_prepare:
        _fits_runs(args, me, data_dir, out_dir, report)

    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    print(f"\nresults: {out_dir / 'bench.json'}")


def _tree_pss_mb(pid: int) -> float:
    """Memory (MB) of a process and all its descendants, from /proc (Linux): the sum of their
    proportional set sizes (PSS), so that the libraries every reader process maps (torch's among
    them) count once rather than once per process, as a sum of RSS would."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack += [int(c) for c in children]
        except (OSError, ValueError):
            continue
    return total / 1024


def _measured_run(cmd: list[str], result: Path) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v`` (its maximum resident set size: the largest single
    process) while sampling the memory of the whole process tree (readers included, PSS) every
    0.2 s from here, outside the run."""
    import threading

    time_v = Path("/usr/bin/time")
    wrapped = [str(time_v), "-v", *cmd] if time_v.is_file() else cmd
    start = time.time()
    proc = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_mb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{err[-3000:]}")
    measured = json.loads(result.read_text())
    measured["wall_s"] = time.time() - start
    measured["tree_peak_pss_mb"] = peak[0]
    for line in err.splitlines():
        if "Maximum resident set size" in line:
            measured["time_v_max_rss_mb"] = int(line.split(":")[1]) / 1024
    return measured


def _stream_runs(args: argparse.Namespace, data_dir: Path, out_dir: Path,
                 report: dict[str, Any]) -> None:
    """Streamed against in-memory training: step rates on the 12,600-image simulated set both
    ways, and a set larger than the memory a run should take, streamed, with its peak memory."""
    from galaxy_lightning.data.synthetic import CLASS_NAMES, SyntheticGalaxies

    bench_dir = data_dir / "bench"
    per_class = max(1, args.stream_images // len(CLASS_NAMES))
    big = SyntheticGalaxies(n_per_class=per_class, image_size=96,
                            filename=f"stream_bench_n{per_class}_s96.h5")
    t0 = time.perf_counter()
    path = big.prepare(bench_dir)
    size_gb = path.stat().st_size / 1e9
    print(f"streamed set: {per_class * len(CLASS_NAMES):,} simulated galaxies at 96 px, "
          f"{size_gb:.2f} GB ({time.perf_counter() - t0:.0f} s to simulate or find)", flush=True)
    steps = args.stream_steps
    common = ["experiment=recommended", f"trainer.max_steps={steps}",
              f"trainer.val_check_interval={steps}", "calibrate=false", "tta=false",
              "callbacks.progress_bar.every_n_steps=1000", "logger=none",
              "+callbacks.step_timer._target_=galaxy_lightning.callbacks.StepTimer"]
    runs = {
        "12,600 in memory": ["data.in_memory=true"],
        "12,600 streamed": ["data.in_memory=false"],
        f"{per_class * len(CLASS_NAMES):,} streamed": [
            "data.in_memory=false", f"data.source.n_per_class={per_class}",
            f"+data.source.filename={path.name}", "data.splits=[0.98,0.01,0.01]"],
    }
    results: dict[str, dict[str, Any]] = {}
    print(f"\nrecommended recipe, {steps} steps of 128, one validation and the test; "
          "ms/step after 20 warm-up steps:")
    print(f"{'run':24s} {'ms/step':>8s} {'img/s':>7s} {'main RSS MB':>12s} {'all PSS MB':>11s} "
          f"{'wall s':>7s}")
    for name, extra in runs.items():
        tag = name.split()[0].replace(",", "") + "_" + name.split()[-1]
        res = out_dir / f"stream_{tag}.json"
        results[name] = r = _measured_run(
            [sys.executable, "-m", "galaxy_lightning.train", *common, *extra,
             f"+callbacks.step_timer.output_file={res}", f"paths.data_dir={bench_dir}",
             f"hydra.run.dir={out_dir / ('stream_' + tag)}"], res)
        print(f"{name:24s} {r['ms_per_step']:8.1f} {r['images_per_s']:7.0f} "
              f"{r.get('time_v_max_rss_mb', float('nan')):12.0f} {r['tree_peak_pss_mb']:11.0f} "
              f"{r['wall_s']:7.0f}", flush=True)
    memory = results["12,600 in memory"]["ms_per_step"]
    for name, r in results.items():
        r["rate_vs_in_memory"] = memory / r["ms_per_step"]
    print("step rate against in memory: " + ", ".join(
        f"{k} {r['rate_vs_in_memory']:.2f}" for k, r in results.items()), flush=True)
    report["stream"] = {"images": per_class * len(CLASS_NAMES), "file_gb": size_gb,
                        "steps": steps, "runs": results}


def _train_py_run(args: argparse.Namespace, data_dir: Path, run_dir: Path, steps: int,
                  overrides: list[str]) -> dict[str, Any]:
    res = run_dir.with_suffix(".json")
    return _timed_process(
        [sys.executable, "-m", "galaxy_lightning.train", *overrides, f"trainer.max_steps={steps}",
         f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", "callbacks.progress_bar.every_n_steps=1000",
         "+callbacks.step_timer._target_=galaxy_lightning.callbacks.StepTimer",
         f"+callbacks.step_timer.output_file={res}"], res)


def _model_runs(args: argparse.Namespace, data_dir: Path, out_dir: Path,
                report: dict[str, Any]) -> None:
    """ms per step of every model in the recommended recipe, float32 and fast mode."""
    steps = args.model_steps
    models = sorted(p.name.removesuffix(".yaml") for p in files(CONFIG_PACKAGE).joinpath("model").iterdir()
                    if p.name.endswith(".yaml"))
    print(f"\nmodels in the recommended recipe (batch 128, its augmentation, {steps} steps; "
          "ms/step includes validation every 250 steps):")
    print(f"{'model':14s} {'params':>9s} {'f32 ms/step':>12s} {'fast ms/step':>13s} "
          f"{'f32 min/6k':>11s} {'fast min/6k':>12s}")
    table: dict[str, dict[str, Any]] = {}
    for model in models:
        row: dict[str, Any] = {}
        for tag, extra in (("f32", ["perf=default", "trainer.precision=32-true"]), ("fast", [])):
            r = _train_py_run(args, data_dir, out_dir / f"model_{model}_{tag}", steps,
                              ["experiment=recommended", f"model={model}", *extra])
            row[tag] = r
            row["params"] = r.get("params")
        table[model] = row
        print(f"{model:14s} {row['params']:9,d} {row['f32']['ms_per_step']:12.1f} "
              f"{row['fast']['ms_per_step']:13.1f} {6000 * row['f32']['ms_per_step'] / 6e4:11.1f} "
              f"{6000 * row['fast']['ms_per_step'] / 6e4:12.1f}", flush=True)
    report["models"] = table


#: How the profile of a recommended run groups Lightning's timed actions (none nested in another
#: of the list), and how each grows with the run: per training step, per validation, or once.
RECIPE_PHASES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("training steps (forward, backward, optimizer)", "step", ("run_training_batch",)),
    ("batches: transfer and augmentation", "step",
     ("[LightningDataModule]GalaxyDataModule.on_after_batch_transfer",)),
    ("batches: sampling", "step", ("[_TrainingEpochLoop].train_dataloader_next",
                                   "[_EvaluationLoop].val_next")),
    ("EMA of the weights: updates", "ema", ("[Callback]WeightAverage.on_train_batch_end",)),
    ("EMA of the weights: swaps for validation, saves", "validation",
     ("[Callback]WeightAverage.on_validation", "[Callback]WeightAverage.on_save_checkpoint")),
    ("BatchNorm statistics before validation", "validation", ("[Callback]BatchNormStatistics.",)),
    ("validation forward", "validation", ("[Strategy]SingleDeviceStrategy.validation_step",
                                          "[Strategy]DDPStrategy.validation_step")),
    ("checkpoints", "validation", ("[Callback]ModelCheckpoint",)),
    ("run figures and history during fit", "validation", ("[Callback]RunArtifacts.on_fit",
                                                           "[Callback]RunArtifacts.on_validation",
                                                           "[Callback]RunArtifacts.on_train")),
)


def recipe_profile(timings: dict[str, Any], steps: int, validations: int, ema_start: int,
                   full_steps: int, full_validations: int, wall_s: float) -> list[dict[str, Any]]:
    """Rows of (phase, seconds measured, seconds projected at full length) from a profiled run's
    ``timings.json``: what grows per step is scaled by the steps, what grows per validation by the
    validations (the sanity check counted as one), the EMA by the steps it averages over,
    everything else (start, setup, the first step with its compilation, calibration, the test,
    the report) taken once, as measured."""
    prof, phases = timings.get("profile", {}), timings["phases_s"]
    scale = {"step": (full_steps - 1) / max(1, steps - 1),
             "validation": (full_validations + 1) / (validations + 1),
             "ema": max(0, full_steps - ema_start) / max(1, steps - ema_start), "once": 1.0}

    def total(prefixes: tuple[str, ...]) -> float:
        return sum(v["total_s"] for k, v in prof.items() if k.startswith(prefixes))

    first = prof.get("run_training_batch", {}).get("first_s", 0.0)
    rows = [{"phase": "process start, imports, config", "grows": "once",
             "seconds": wall_s - timings["total_s"]},
            {"phase": "setup: data, model, loggers", "grows": "once", "seconds": phases.get("setup", 0)},
            {"phase": "first training step (compilation included)", "grows": "once", "seconds": first}]
    in_fit = first
    for name, grows, prefixes in RECIPE_PHASES:
        seconds = total(prefixes) - (first if prefixes == ("run_training_batch",) else 0.0)
        in_fit += seconds
        rows.append({"phase": name, "grows": grows, "seconds": seconds})
    rows.append({"phase": "rest of fit (loops, logging, progress)", "grows": "step",
                 "seconds": phases.get("fit", 0.0) - in_fit})
    test_forward = total(("[Strategy]SingleDeviceStrategy.test_step", "[Strategy]DDPStrategy.test_step"))
    test_figures = total(("[Callback]RunArtifacts.on_test",))
    rows += [{"phase": "load tested weights, temperature scaling (validation set, TTA)",
              "grows": "once", "seconds": phases.get("load_and_calibrate", 0.0)},
             {"phase": "test forward (TTA: 8 views)", "grows": "once", "seconds": test_forward},
             {"phase": "test figures, metrics.json", "grows": "once", "seconds": test_figures},
             {"phase": "rest of test", "grows": "once",
              "seconds": phases.get("test", 0.0) - test_forward - test_figures},
             {"phase": "loggers, report.html, exit", "grows": "once",
              "seconds": phases.get("loggers", 0.0) + phases.get("report", 0.0)
              + timings["total_s"] - sum(phases.values())}]
    for r in rows:
        r["projected_s"] = r["seconds"] * scale[r["grows"]]
    return rows


def recipe_steps(recipe: Any) -> int:
    """The recommended run's length on the simulated set: its fixed ``trainer.max_steps``, or,
    when the length follows the data (``length``), what ``apply_length`` makes of the default
    split's training images (batches of an epoch drop the last partial one)."""
    from omegaconf import OmegaConf

    steps = int(recipe.trainer.get("max_steps", -1))
    length = recipe.get("length")
    if steps != -1 or not length:
        return steps
    split = OmegaConf.create(files(CONFIG_PACKAGE).joinpath("data", "_datamodule.yaml").read_text())
    per_epoch = int(split.splits[0]) // int(recipe.data.batch_size)
    return length_steps(length, per_epoch)


def _recipe_profile(args: argparse.Namespace, data_dir: Path, out_dir: Path,
                    report: dict[str, Any]) -> None:
    """A shortened ``experiment=recommended`` run under Lightning's simple profiler: where its
    time goes, and the minutes of the full recipe projected from it, phase by phase."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.create(files(CONFIG_PACKAGE).joinpath("experiment", "recommended.yaml")
                              .read_text())
    ema = OmegaConf.create(files(CONFIG_PACKAGE).joinpath("callbacks", "ema.yaml").read_text())
    full_steps, every = recipe_steps(recipe), int(recipe.trainer.val_check_interval)
    steps = args.recipe_steps
    interval = max(1, steps // 4)
    run_dir = out_dir / "recipe"
    start = time.time()
    cmd = [sys.executable, "-m", "galaxy_lightning.train", "experiment=recommended",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={interval}",
           "trainer.profiler=simple", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
           "callbacks.progress_bar.every_n_steps=1000", "print_config=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall = time.time() - start
    timings = json.loads((run_dir / "timings.json").read_text())
    rows = recipe_profile(timings, steps, steps // interval, int(ema.ema.update_starting_at_step),
                          full_steps, full_steps // every, wall)
    measured, projected = sum(r["seconds"] for r in rows), sum(r["projected_s"] for r in rows)
    print(f"\nexperiment=recommended, profiled ({steps} steps, validation every {interval}; "
          f"Lightning's simple profiler), and projected to the recipe's {full_steps:,} steps with "
          f"validation every {every}:")
    print(f"{'phase':62s} {'grows':>10s} {'measured s':>11s} {'projected s':>12s} {'share':>6s}")
    for r in rows:
        print(f"{r['phase']:62s} {r['grows']:>10s} {r['seconds']:11.1f} {r['projected_s']:12.1f} "
              f"{100 * r['projected_s'] / projected:5.1f}%")
    print(f"{'whole process':62s} {'':>10s} {measured:11.1f} {projected:12.1f}")
    print(f"recommended run: {wall / 60:.1f} min measured for {steps} steps; "
          f"{projected / 60:.1f} min projected for {full_steps:,} steps", flush=True)
    report["recipe"] = {"steps": steps, "validation_every": interval, "wall_s": wall,
                        "projected_full_min": projected / 60, "phases": rows,
                        "run_dir": str(run_dir)}


def _tutorial_runs(args: argparse.Namespace, me: list[str], synthetic: Path, data_dir: Path,
                   out_dir: Path, report: dict[str, Any]) -> None:
    """The tutorial's own loop against ``train.py`` (float32 and fast mode), each a whole process
    of ``--steps`` steps, in ``--rounds`` alternated rounds (tutorial, float32, fast, tutorial,
    ...), so that a machine that slows down or speeds up during the benchmark shifts every run
    alike. Two ratios: of the steady step times, and of the whole processes (start to exit:
    imports, data, compile, validation, checkpoints and test included), the one a user waits."""
    # 2. training runs
    names = ("tutorial loop (baseline)", "train.py float32", "train.py perf=fast",
             "bare loop float32 (limit)", "bare loop fast (limit)")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}

    def worker(kind: str, k: int) -> dict[str, Any]:
        res = out_dir / f"{kind}_{k}.json"
        return _timed_process([*me, "--worker", kind, "--steps", str(args.steps), "--source",
                               str(synthetic), "--result", str(res)], res)

    for k in range(args.rounds):
        rounds[names[0]].append(worker("tutorial", k))
        for name, extra in zip(names[1:3], ([], ["perf=fast"])):
            tag = ("fast" if extra else "f32") + f"_{k}"
            rounds[name].append(_train_py_run(args, data_dir, out_dir / tag, args.steps,
                                              ["experiment=tutorial_synthetic", *extra]))
        rounds[names[3]].append(worker("bare", k))
        rounds[names[4]].append(worker("bare-fast", k))
        print(f"  round {k + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rounds[name][-1]['wall_s']:.1f} s" for name in names), flush=True)
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        r = dict(rounds[name][-1])
        for key in ("ms_per_step", "images_per_s", "wall_s", "first_step_s"):
            r[key] = sum(x[key] for x in rounds[name]) / args.rounds
        r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rounds[name])
        r["rounds"] = rounds[name]
        runs[name] = r
    base = runs[names[0]]
    print(f"\n{args.steps} steps, mean of {args.rounds} alternated round(s):")
    print(f"{'run':28s} {'ms/step':>8s} {'img/s':>8s} {'x base':>7s} {'peak MB':>8s} "
          f"{'1st step s':>10s} {'wall s':>7s} {'x base wall':>12s}")
    for name, r in runs.items():
        r["speedup"] = base["ms_per_step"] / r["ms_per_step"]
        r["speedup_wall"] = base["wall_s"] / r["wall_s"]
        print(f"{name:28s} {r['ms_per_step']:8.1f} {r['images_per_s']:8.0f} {r['speedup']:7.2f} "
              f"{r['peak_rss_mb']:8.0f} {r['first_step_s']:10.1f} {r['wall_s']:7.1f} "
              f"{r['speedup_wall']:12.2f}")
    full = {name: 10000 * r["ms_per_step"] / 1e3 / 60 for name, r in runs.items()}
    print("projected 10,000 steps: " + ", ".join(f"{k} {v:.1f} min" for k, v in full.items()))
    for mode, bare in (("float32", names[3]), ("perf=fast", names[4])):
        over = runs[f"train.py {mode}"]["ms_per_step"] - runs[bare]["ms_per_step"]
        print(f"the Trainer's cost per step over the bare loop, {mode}: {over:.1f} ms "
              f"({100 * over / runs[bare]['ms_per_step']:.0f}%)")
    report["runs"] = runs

    # 3. Galaxy10 preparation from a full-size file
    if not args.skip_prepare:
        big = data_dir / "bench" / "Galaxy10_DECals_fullsize.h5"
        if not big.exists():
            print("\nwriting the full-size Galaxy10 look-alike once (reused later) ...", flush=True)
            res = out_dir / "fullsize.json"
            report["fullsize_write_s"] = _timed_process(
                [*me, "--worker", "fullsize", "--source", str(synthetic), "--result", str(res)], res)["seconds"]
            print(f"  {report['fullsize_write_s']:.0f} s, {big.stat().st_size / 1e9:.2f} GB", flush=True)
        (data_dir / "bench" / "bench_prepared.h5").unlink(missing_ok=True)
        res = out_dir / "prepare.json"
        prep = _timed_process([*me, "--worker", "prepare", "--source", str(big), "--result", str(res)], res)
        report["prepare_galaxy10"] = prep
        print(f"\nGalaxy10 subset from a full-size file ({big.stat().st_size / 1e9:.2f} GB): "
              f"{prep['seconds']:.1f} s, peak RSS {prep['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
