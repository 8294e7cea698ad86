"""Process-level performance settings applied before training (the ``perf`` config group).

The main one is the allocator. Every training step allocates and frees tensors of 20-30 MB
(the float batch, the first convolution's activations and their gradients). glibc serves blocks
that large with fresh ``mmap`` pages and returns them on free, so every step pays tens of
thousands of page faults; its adaptive threshold makes this happen in some runs and not others.
Keeping such blocks in the heap (``mallopt`` M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) removed that
cost: the tutorial model went from 60-71 ms to 41-43 ms per step on a 2-core CPU (README,
Performance). The price is that freed memory stays with the process until it exits.

The other is the precision of ``perf=fast``: bfloat16 autocast pays only where the hardware
computes in bfloat16. On a CPU without AVX512-BF16 or AMX, PyTorch emulates it, and a BN-CNN
step took 10.6x as long as in float32 (4,433 vs 419 ms, batch 128, 2-core AVX2 EPYC), so fast
mode picks its precision per machine (:func:`fast_precision`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in the heap (glibc only); returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    return ok


def parallel_job_threads() -> int | None:
    """Threads per job when Hydra's joblib launcher runs jobs side by side on this machine.

    ``n_jobs`` processes that each use every core would fight over them (on 2 cores, 2 jobs of
    2 threads run slower than 1 job); each job gets ``cores // n_jobs`` threads instead.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ValueError, ImportError, AttributeError):
        return None
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    cores = os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs", -1) or -1)
    running = min(n_jobs, cores) if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // running)


#: torch's float32 matrix-multiplication precisions (``torch.set_float32_matmul_precision``).
MATMUL_PRECISIONS = ("highest", "high", "medium")


def check_matmul_precision(value: str | None) -> None:
    if value is not None and value not in MATMUL_PRECISIONS:
        from galaxy_lightning.errors import ConfigError

        raise ConfigError(f"matmul_precision={value!r} must be one of {', '.join(MATMUL_PRECISIONS)} "
                          "or null")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 (AVX512-BF16 or AMX on x86; torch's own probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment() -> dict[str, Any]:
    """What a run ran on, for its report: a timing or a result means little without the machine
    (bfloat16 is native on some CPUs and ~10x slower on others) and the versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(),
            "gpu": gpu, "gpus": torch.cuda.device_count() if gpu else 0,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "lightning": installed("lightning"),
            "galaxy_lightning": installed("galaxy_lightning")}


def _cuda_has_native_bf16() -> bool:
    try:  # without emulation: pre-Ampere GPUs (V100, T4) emulate bfloat16 slowly
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def _device_kind(accelerator: str) -> str:
    """``cuda``, ``cpu``, ``mps`` or ``other``: what a Trainer ``accelerator`` trains on here."""
    name = str(accelerator).lower()
    if name == "auto":
        return ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    return {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu", "mps": "mps"}.get(name, "other")


def fast_precision(accelerator: str = "auto") -> str:
    """The Trainer precision of ``perf=fast`` for ``accelerator`` on this machine.

    bfloat16 mixed precision where the device computes in it; float16 mixed precision (with
    Lightning's gradient scaling) on CUDA GPUs without it; float32 on CPUs without it, where
    emulated bfloat16 is an order of magnitude slower than float32; float32 on Apple GPUs, where
    Lightning's bf16 autocast is not supported (not measured here: no such machine).
    """
    kind = _device_kind(accelerator)
    if kind == "cuda":  # without a GPU, Lightning itself says so
        native = not torch.cuda.is_available() or _cuda_has_native_bf16()
        return "bf16-mixed" if native else "16-mixed"
    if kind == "cpu":
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true" if kind == "mps" else "bf16-mixed"


def slow_precision_warning(precision: object, accelerator: str = "auto") -> str | None:
    """A line to log when ``precision`` asks for bfloat16 that this CPU would only emulate."""
    if _device_kind(accelerator) != "cpu" or "bf16" not in str(precision) or cpu_has_native_bf16():
        return None
    return (f"trainer.precision={precision}: this CPU has no bfloat16 arithmetic (AVX512-BF16 "
            "or AMX), PyTorch emulates it, about 10x slower than float32; trainer.precision=32-true "
            "(or perf=fast, which chooses per machine) is faster here")


def apply(tune_malloc_enabled: bool = True, threads: int | None = None,
          matmul_precision: str | None = None) -> None:
    """Apply the ``perf`` settings of a run config to this process."""
    check_matmul_precision(matmul_precision)
    if tune_malloc_enabled and not tune_malloc():
        log.info("perf.tune_malloc: not a glibc system, allocator left as is")
    threads = threads or parallel_job_threads()
    if threads:
        torch.set_num_threads(int(threads))
    if matmul_precision:
        torch.set_float32_matmul_precision(matmul_precision)
