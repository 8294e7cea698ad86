"""Batches read from the prepared file as they are needed, for data sets larger than memory.

In memory (the default for sets that fit), a split is one uint8 tensor and a batch is a gather
from it. Streamed (``data.in_memory=false``, or ``auto`` for a file too large for the machine),
a split keeps only its labels, soft targets and identity columns in memory; a batch's images are
read from the prepared HDF5 file in the loader's worker processes (each opens the file itself:
h5py handles do not cross processes), as a few large slab reads rather than one read per image:
the split's rows are kept in file order, and the training order is a seeded permutation of
*blocks* of consecutive rows followed by a shuffle within a bounded window
(:func:`block_order`), so a batch of 128 touches a handful of contiguous stretches of the file.
The order is still a function of (seed, epoch) only, which is what keeps exact resume and the
disjoint shares of DDP ranks (:class:`~galaxy_lightning.data.datamodule.EpochBatchSampler`).

Memory: the images of the batches in flight (workers x prefetch x batch), h5py's chunk cache per
worker, and the per-row columns (labels, targets, ids: about 100 bytes a row), whatever the
number of images. The operating system's page cache holds recently read parts of the file, but
that is reclaimable memory, not the process's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from galaxy_lightning.errors import ConfigError, DataError

#: ``in_memory: auto`` streams when the images would take more than this share of the memory
#: available to the process (the smaller of the machine's available memory and a cgroup limit):
#: the rest is for the model, the batches, the loader and everything else on the machine.
AUTO_SHARE = 0.5
#: Rows further apart than this in the file are read as separate slabs (else one slab covers
#: both, reading the rows between them too: cheaper than another seek for small gaps).
MAX_GAP = 8


def available_memory() -> int:
    """Bytes of memory this process can use: the machine's available memory
    (``/proc/meminfo``), capped by a cgroup v2 or v1 limit (a container, a SLURM job)."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap.isdigit() and int(cap) < 1 << 60:
                candidates.append(int(cap) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    if not candidates:  # not Linux: all physical memory
        candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return max(0, min(candidates))


def decide_streaming(in_memory: bool | str, image_bytes: int, device_resident: bool = False,
                     available: int | None = None) -> bool:
    """Whether to stream: ``in_memory`` false, or ``auto`` and the images need more than
    :data:`AUTO_SHARE` of the available memory."""
    if in_memory not in (True, False, "auto"):
        raise ConfigError(f"data.in_memory={in_memory!r} must be true, false or auto")
    stream = in_memory is False or (
        in_memory == "auto"
        and image_bytes > AUTO_SHARE * (available_memory() if available is None else available))
    if stream and device_resident:
        raise ConfigError("data.device_resident=true keeps every image on the GPU, which a "
                          "streamed data set does not fit; set data.in_memory=true or "
                          "data.device_resident=false")
    return stream


def block_order(num_items: int, block: int, generator: torch.Generator,
                window: int) -> torch.Tensor:
    """A permutation of ``range(num_items)`` made of blocks of ``block`` consecutive items in a
    random order, then shuffled within consecutive windows of ``window`` items: neighbours in the
    file stay near each other in time (large reads), while a batch still mixes several blocks."""
    starts = torch.arange(0, num_items, block)
    blocks = [torch.arange(int(s), min(int(s) + block, num_items))
              for s in starts[torch.randperm(len(starts), generator=generator)]]
    order = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.int64)
    for lo in range(0, num_items, window):
        part = order[lo:lo + window]
        order[lo:lo + window] = part[torch.randperm(len(part), generator=generator)]
    return order


class H5Rows:
    """The images of some rows of a prepared file, read on demand: ``rows[index]`` is a uint8
    tensor (n, H, W, C), as indexing an in-memory split would give. Picklable: the file is opened
    lazily in each process that reads."""

    device = torch.device("cpu")

    def __init__(self, path: Path, rows: np.ndarray, shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *shape)
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}

    def _images(self) -> h5py.Dataset:
        if self._file is None:
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise DataError(f"{self.path}: cannot open the prepared file to stream it "
                                f"({err}); was it moved or deleted during the run?") from None
        return self._file["images"]

    def __getitem__(self, index: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(len(self.rows))[index]
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        wanted = self.rows[index]
        unique, inverse = np.unique(wanted, return_inverse=True)
        out = np.empty((len(unique), *self.shape[1:]), dtype=np.uint8)
        images = self._images()
        # slabs: runs of sorted rows with gaps of at most MAX_GAP, each one contiguous read
        breaks = np.flatnonzero(np.diff(unique) > MAX_GAP) + 1
        done = 0
        try:
            for run in np.split(unique, breaks):
                if not len(run):
                    continue
                slab = images[int(run[0]):int(run[-1]) + 1]
                out[done:done + len(run)] = slab[run - run[0]]
                done += len(run)
        except OSError as err:
            raise DataError(f"{self.path}: reading images failed while streaming ({err}); "
                            "delete it so that it is prepared again") from None
        return torch.from_numpy(out[inverse.reshape(-1)])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

