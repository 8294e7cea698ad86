"""Fetch a large file safely: streamed, resumable (HTTP Range), SHA256-verified, renamed when whole.

The download goes to ``<name>.part`` beside the target. An interrupted transfer is resumed from
the bytes already there (on the next attempt, or the next run). The file appears under its real
name only after its SHA256 matches the published one, so a partial or corrupt file is never taken
for a complete one. A verified file gets a small ``<name>.sha256`` marker (size, mtime, digest),
so later runs do not hash 2.5 GB again.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from galaxy_lightning import console
from galaxy_lightning.data.prepared import file_lock
from galaxy_lightning.errors import DataError
from galaxy_lightning.files import write_atomic

CHUNK = 1 << 20


def sha256_of(path: Path, progress: bool = False) -> str:
    """SHA256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, console.progress(total=path.stat().st_size, unit="B", unit_scale=True,
                                                 desc=f"verifying {path.name}", enabled=progress) as bar:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remember(path: Path, digest: str) -> None:
    """Write the verification marker of ``path`` (atomically; skipped on a read-only folder)."""
    marker = _marker(path)
    try:
        write_atomic(marker, json.dumps({"identity": _identity(path), "sha256": digest}))
    except OSError:
        pass  # a read-only data directory: verify again next time


def file_sha256(path: Path, progress: bool = True) -> str:
    """SHA256 of ``path``, cached in a marker file while the file's size and mtime are unchanged."""
    marker = _marker(path)
    try:
        cached = json.loads(marker.read_text())
        if cached.get("identity") == _identity(path):
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_of(path, progress)
    _remember(path, digest)
    return digest


def verify(path: Path, sha256: str | None, progress: bool = True) -> None:
    """Raise a one-line error unless ``path`` has the expected SHA256 (None: no check)."""
    if sha256 is None:
        return
    found = file_sha256(path, progress)
    if found != sha256.lower():
        raise DataError(f"{path}: SHA256 {found[:16]}... does not match the published "
                        f"{sha256[:16]}...; the file is incomplete or corrupt: delete it and run "
                        "again to download it")


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (resuming from its size); raises on any failure."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "galaxy_lightning"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left to send: the part is already complete
            return
        raise
    with response:
        if start and response.status != 206:  # the server ignored Range: start again
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        try:
            out = open(part, "ab" if start else "wb")
        except OSError as err:
            raise _cannot_write(part, err) from None
        with out, console.progress(total=total, initial=start, unit="B", unit_scale=True,
                                   desc=f"downloading {part.name[:-5]}", enabled=progress) as bar:
            received = 0
            for block in iter(lambda: response.read(CHUNK), b""):
                try:
                    out.write(block)
                except OSError as err:  # a full disk is ours to fix, not the server's
                    raise _cannot_write(part, err) from None
                received += len(block)
                bar.update(len(block))
        if length is not None and received < int(length):
            raise http.client.IncompleteRead(b"", int(length) - received)


def _cannot_write(part: Path, err: OSError) -> DataError:
    """A local write failure (a full disk, a read-only folder): not worth retrying or another
    mirror. What arrived stays in the .part file, from which the next attempt resumes."""
    return DataError(f"cannot write {part} ({err.strerror or err}); free space in the data "
                     "directory or choose another, then run again: the download resumes from "
                     "what arrived")


def download(urls: Sequence[str], target: Path, sha256: str | None, timeout: float = 60.0,
             retries: int = 3, progress: bool = True) -> Path:
    """Make ``target`` exist with the given SHA256, downloading it from the first URL that works.

    Each URL gets ``retries`` attempts; every attempt resumes where the last one stopped.
    """
    target = Path(target)
    if target.exists():
        verify(target, sha256, progress)
        return target
    with file_lock(target):  # another process may be downloading the same file right now
        if target.exists():
            verify(target, sha256, progress)
            return target
        return _download(urls, target, sha256, timeout, retries, progress)


def _download(urls: Sequence[str], target: Path, sha256: str | None, timeout: float,
              retries: int, progress: bool) -> Path:
    part = target.with_name(target.name + ".part")
    errors: list[str] = []
    for url in urls:
        fetched = False
        for _ in range(max(1, retries)):
            try:
                _fetch(url, part, timeout, progress)
                fetched = True
                break
            except urllib.error.HTTPError as err:
                errors.append(f"{url}: HTTP {err.code}")
                if err.code in (401, 403, 404, 410):
                    break  # no use retrying this URL
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                    ConnectionError, OSError) as err:
                errors.append(f"{url}: {getattr(err, 'reason', None) or err.__class__.__name__}")
        if not fetched or not part.exists():
            continue
        found = sha256_of(part, progress)
        if sha256 is not None and found != sha256.lower():
            part.unlink()  # ours, and wrong: never resume from it
            errors.append(f"{url}: SHA256 mismatch (got {found[:16]}...)")
            continue
        os.replace(part, target)
        _remember(target, found)
        return target
    reason = "; ".join(errors[-3:]) or "no URL given"
    raise DataError(f"could not download {target.name} ({reason}); download it by hand from "
                    f"{urls[0] if urls else 'its publisher'} and put it at {target}")
