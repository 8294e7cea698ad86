"""Atomic file writes: every output is written to a temporary name beside its target and renamed
into place only once complete, so a run that is killed mid-write leaves the previous file (or
none), never a truncated one that a later reader would take for real.

The temporary name is ``.<name>.<pid>.tmp``: hidden, in the same folder (a rename within one file
system is atomic), and distinct per process, so two writers never share one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (a library's ``save(path)``): renamed
    over ``path`` when the block completes, removed whatever else happens."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO]:
    """An open temporary file (``mode`` "w" or "wb"; ``newline`` as for ``open``, "" for the csv
    module) that replaces ``path`` when the block completes, flushed to disk first so that the
    rename never exposes unwritten data."""
    with atomic_path(path) as tmp, open(tmp, mode, newline=newline) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
