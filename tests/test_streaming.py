"""Streamed data (``data.in_memory=false``): the images stay in the prepared file and are read as
batches need them. It must give the same images as memory does, keep the epoch semantics (every
training image once per epoch, disjoint shares for DDP ranks), resume exactly after a kill, and
hold no image in memory that a batch does not need."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from galaxy_lightning.data.datamodule import EpochBatchSampler, split_indices
from galaxy_lightning.data.prepared import read_prepared
from galaxy_lightning.data.streaming import H5Rows, block_order, decide_streaming
from galaxy_lightning.errors import ConfigError

from .test_faults import galaxy_train, results


def datamodule(make_cfg: Callable[..., DictConfig], *overrides: str) -> object:
    cfg = make_cfg(*overrides)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return dm


def test_block_order_is_a_seeded_permutation_of_contiguous_blocks() -> None:
    def order(seed: int) -> torch.Tensor:
        return block_order(1000, 32, torch.Generator().manual_seed(seed), window=256)

    first = order(0)
    assert sorted(first.tolist()) == list(range(1000))
    assert torch.equal(first, order(0)) and not torch.equal(first, order(1))
    # locality: a window of 256 consecutive positions draws from at most 9 blocks of the file
    blocks = [len(set((first[i:i + 256] // 32).tolist())) for i in range(0, 1000, 256)]
    assert max(blocks) <= 9, blocks
    assert not torch.equal(first[:32].sort().values, first[:32])  # shuffled within the window


def test_streamed_splits_hold_the_same_images_as_memory(
        make_cfg: Callable[..., DictConfig]) -> None:
    memory = datamodule(make_cfg)
    streamed = datamodule(make_cfg, "data.in_memory=false", "data.stream_workers=0")
    assert streamed.streamed and not memory.streamed
    data = read_prepared(memory.path)
    index = split_indices(data.labels, data.split, memory.splits, memory.split_seed, memory.path)
    for name in ("train", "val", "test"):
        split = streamed.split(name)
        assert isinstance(split.images, H5Rows)
        rows = split.images.rows
        assert sorted(rows.tolist()) == sorted(index[name].tolist())  # the same rows ...
        assert (np.diff(rows) > 0).all()  # ... in file order
        # any batch of rows, in any order, holds the file's images of those rows
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))[:50]
        assert np.array_equal(split.images[pick].numpy(), data.images[rows[pick.numpy()]])
        assert torch.equal(split.labels, torch.from_numpy(data.labels[rows]))
    images, labels = streamed.examples(per_class=2)
    assert images.shape == (2 * 7, 32, 32, 3) and sorted(set(labels.tolist())) == list(range(7))


def test_two_ranks_together_see_every_training_image_once_per_epoch(
        make_cfg: Callable[..., DictConfig]) -> None:
    """Each DDP rank draws the same seeded block order and takes its own whole batches: their
    shares are disjoint and together cover the epoch (the batches an uneven remainder leaves
    out are the same rows on both ranks, and differ from epoch to epoch)."""
    streamed = datamodule(make_cfg, "data.in_memory=false", "data.stream_workers=0")
    train = streamed.split("train")
    batch, n = streamed.batch_size, len(train)
    seen_per_epoch = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = EpochBatchSampler(n, batch, shuffle=True, seed=0, drop_last=True, rank=rank,
                                        world_size=2, block=streamed.stream_block)
            sampler.set_epoch(epoch)
            rows = [train.images.rows[b.numpy()] for b in sampler]
            assert len(rows) == len(sampler)
            seen.append(np.concatenate(rows))
        assert not set(seen[0]) & set(seen[1])  # disjoint
        together = np.concatenate(seen)
        assert len(together) == len(set(together)) == (n // batch // 2) * 2 * batch
        seen_per_epoch.append(set(together))
    assert seen_per_epoch[0] != seen_per_epoch[1]


def test_in_memory_auto_streams_only_what_does_not_fit() -> None:
    gib = 2**30
    assert decide_streaming("auto", 3 * gib, available=4 * gib)  # more than half: stream
    assert not decide_streaming("auto", 1 * gib, available=4 * gib)
    assert decide_streaming(False, 1) and not decide_streaming(True, 100 * gib)
    with pytest.raises(ConfigError, match="must be true, false or auto"):
        decide_streaming("sometimes", 1)
    with pytest.raises(ConfigError, match="device_resident"):
        decide_streaming(False, 1, device_resident=True)


STREAMED = ["data.in_memory=false", "data.stream_workers=1"]


@pytest.fixture(scope="module")
def streamed_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("streamed")
    done = galaxy_train(*STREAMED, run=base / "whole", data_dir=base / "data")
    assert done.returncode == 0, done.stderr[-3000:]
    return results(base / "whole"), base / "data"


@pytest.mark.slow
@pytest.mark.parametrize("moment, step", [("train", 13)])  # mid-epoch, the reader running
def test_a_streamed_run_killed_resumes_to_the_same_result(
        streamed_reference: tuple, tmp_path: Path, moment: str, step: int) -> None:
    """As the in-memory kill tests (tests/test_faults.py), with the images read by a reader
    process: killed mid-epoch, resumed, identical to the whole run."""
    expected, data_dir = streamed_reference
    killed = galaxy_train(*STREAMED, "+callbacks.fault._target_=tests.faults.KillAt",
                          f"+callbacks.fault.moment={moment}", f"+callbacks.fault.step={step}",
                          run=tmp_path / "killed", data_dir=data_dir)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    resumed = galaxy_train(*STREAMED, f"ckpt_path={last}", run=tmp_path / "resumed",
                           data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(tmp_path / "resumed") == expected
