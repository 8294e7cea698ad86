"""The simulator and the DataModule: determinism, balance, physics, splits and batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from galaxy_lightning.data.datamodule import EpochBatchSampler, GalaxyDataModule
from galaxy_lightning.data.synthetic import CLASS_NAMES, SyntheticGalaxies, simulate
from galaxy_lightning.errors import GalaxyError


def test_simulator_is_deterministic_balanced_and_chunk_independent() -> None:
    images, labels = simulate(4, image_size=48, seed=3)
    again, _ = simulate(4, image_size=48, seed=3)
    other, _ = simulate(4, image_size=48, seed=4)
    assert images.dtype == np.uint8 and images.shape == (28, 48, 48, 3)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert np.bincount(labels).tolist() == [4] * 7
    part, part_labels = simulate(4, image_size=48, seed=3, start=10, stop=17)
    assert np.array_equal(part, images[10:17]) and np.array_equal(part_labels, labels[10:17])


def test_simulated_classes_follow_the_physics() -> None:
    images, labels = simulate(40, image_size=64, seed=0)
    flux = images.astype(np.float64)
    red, blue = flux[..., 0].sum((1, 2)), flux[..., 2].sum((1, 2))
    colour = red / blue
    ellipticals = np.isin(labels, [1, 2])
    spirals = np.isin(labels, [3, 4, 5])
    # Old stellar populations (ellipticals) are redder than star-forming disks.
    assert colour[ellipticals].mean() > colour[spirals].mean() + 0.1

    def elongation(img: np.ndarray) -> float:
        w = img.astype(np.float64).mean(-1)
        w = np.clip(w - np.median(w), 0, None) ** 2
        y, x = np.indices(w.shape)
        m = w.sum()
        cx, cy = (w * x).sum() / m, (w * y).sum() / m
        cov = np.cov(np.stack([x.ravel() - cx, y.ravel() - cy]), aweights=w.ravel())
        ev = np.linalg.eigvalsh(cov)
        return float(np.sqrt(ev[1] / max(ev[0], 1e-9)))

    e = np.array([elongation(im) for im in images])
    # Edge-on disks are much flatter than round ellipticals; in-between ones lie between.
    assert np.median(e[labels == 6]) > np.median(e[labels == 2]) > np.median(e[labels == 1])


def test_synthetic_source_caches_by_parameters(tmp_path: Path) -> None:
    source = SyntheticGalaxies(n_per_class=5, image_size=32, seed=1)
    path = source.prepare(tmp_path, progress=False)
    stamp = os.stat(path).st_mtime_ns
    assert SyntheticGalaxies(n_per_class=5, image_size=32, seed=1).prepare(tmp_path) == path
    assert os.stat(path).st_mtime_ns == stamp  # reused, not regenerated
    other = SyntheticGalaxies(n_per_class=5, image_size=32, seed=2).prepare(tmp_path, progress=False)
    assert other != path and other.exists()


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dm")
    SyntheticGalaxies(n_per_class=20, image_size=32, seed=0).prepare(d, progress=False)
    return d


def make_dm(d: Path, **kwargs) -> GalaxyDataModule:
    args = {"batch_size": 16, "eval_batch_size": 25, "splits": [90, 25, 25], "split_seed": 0}
    args.update(kwargs)
    return GalaxyDataModule(SyntheticGalaxies(n_per_class=20, image_size=32, seed=0), str(d), **args)


def test_splits_are_disjoint_sized_and_reproducible(prepared_dir: Path) -> None:
    dm = make_dm(prepared_dir)
    dm.setup()
    sizes = [len(dm.split(s)) for s in ("train", "val", "test")]
    assert sizes == [90, 25, 25]
    flat = {s: dm.split(s).images.reshape(len(dm.split(s)), -1) for s in ("train", "val", "test")}
    rows = {s: {bytes(r.numpy()) for r in v} for s, v in flat.items()}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"])
    same = make_dm(prepared_dir)
    assert torch.equal(same.split("test").images, dm.split("test").images)
    other = make_dm(prepared_dir, split_seed=1)
    assert not torch.equal(other.split("test").labels, dm.split("test").labels)
    fractions = make_dm(prepared_dir, splits=[0.5, 0.25, 0.25])
    assert [len(fractions.split(s)) for s in ("train", "val", "test")] == [70, 35, 35]


@pytest.mark.parametrize("splits, message", [
    ([100, 30, 30], "needs 160 images but"),
    ([100, 0, 30], "give 3 positive counts"),
    ([0.9, 0.2, 0.1], "sum to at most 1"),
    ([0.98, 0.019, 0.001], "empty test split"),
])
def test_bad_splits_are_reported(prepared_dir: Path, splits: list, message: str) -> None:
    with pytest.raises(GalaxyError, match=message):
        make_dm(prepared_dir, splits=splits).setup()


def test_batches_are_gathered_converted_and_reproducible(prepared_dir: Path) -> None:
    dm = make_dm(prepared_dir)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 90 // 16  # whole batches only, for the training split
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (16, 32, 32, 3)
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, images.permute(0, 3, 1, 2).float() / 256)
    assert float(x.max()) < 1.0 and torch.equal(y, labels)
    # Each epoch is a new permutation that depends only on (seed, epoch).
    sampler = EpochBatchSampler(90, 16, shuffle=True, seed=0, drop_last=True)
    first = torch.cat(list(sampler))
    sampler.set_epoch(1)
    second = torch.cat(list(sampler))
    sampler.set_epoch(0)
    assert torch.equal(torch.cat(list(sampler)), first) and not torch.equal(first, second)
    assert len(torch.unique(first)) == len(first) == 80
    val = torch.cat([b[1] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.split("val").labels)  # evaluation sees every image once, in order


def test_examples_cover_every_class(prepared_dir: Path) -> None:
    images, labels = make_dm(prepared_dir).examples(per_class=3)
    assert images.shape[1:] == (32, 32, 3)
    assert np.bincount(labels, minlength=7).tolist() == [3] * len(CLASS_NAMES)


def test_device_resident_data_stays_on_the_training_device(prepared_dir: Path) -> None:
    import lightning as L

    dm = make_dm(prepared_dir, device_resident=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1)
    dm.trainer = trainer
    dm.setup()
    root = trainer.strategy.root_device
    assert dm.split("train").images.device == root and dm.split("test").labels.device == root
    images, labels = next(iter(dm.train_dataloader()))
    assert images.device == root and images.shape == (16, 32, 32, 3)
