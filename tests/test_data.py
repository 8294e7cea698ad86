"""Data: the simulator, the prepared format, the input contract, the DataModule and augmentation."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from galaxy_lightning.data.augment import (
    Augmentation,
    dihedral,
    dihedral_views,
    random_dihedral,
    random_rotate_shift,
    rotate_shift,
)
from galaxy_lightning.data.datamodule import EpochBatchSampler, GalaxyDataModule
from galaxy_lightning.data.prepared import (
    PreparedWriter,
    provenance_matches,
    read_info,
    read_prepared,
)
from galaxy_lightning.data.synthetic import CLASS_NAMES, SyntheticGalaxies, simulate
from galaxy_lightning.errors import ConfigError, DataError, GalaxyError
from galaxy_lightning.input_spec import InputSpec, Preprocess, SizeMismatch
from galaxy_lightning.train import build, build_and_prepare

from .helpers import DIHEDRAL_INVERSE, write_prepared


# -- the simulator -------------------------------------------------------------------------------
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




# -- the prepared format -------------------------------------------------------------------------
NAMES = ["a", "b", "c"]
SPEC = InputSpec(class_names=tuple(NAMES), channels=3, image_size=8)


def arrays(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64)


def test_round_trip(tmp_path: Path) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, SPEC, {"source": "test", "k": 1})
    data = read_prepared(path)
    assert np.array_equal(data.images, images) and np.array_equal(data.labels, labels)
    assert data.info.class_names == NAMES and data.info.provenance == {"source": "test", "k": 1}
    assert (data.info.num_images, data.info.height, data.info.width, data.info.channels) == (12, 8, 8, 3)
    assert data.split is None and data.columns == {}
    assert data.info.spec == SPEC
    assert provenance_matches(path, {"source": "test", "k": 1})
    assert not provenance_matches(path, {"source": "test", "k": 2})


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, SPEC, {"v": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with PreparedWriter(path, 12, SPEC, {"v": 2}) as writer:
            writer.write(images[:6], labels[:6])
            raise RuntimeError("killed half way")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5"]
    with pytest.raises(ValueError, match="wrote 6 of 12"):
        with PreparedWriter(tmp_path / "q.h5", 12, SPEC, {}) as writer:
            writer.write(images[:6], labels[:6])
    assert not (tmp_path / "q.h5").exists()


def _mutate(path: Path, fn) -> None:
    with h5py.File(path, "a") as f:
        fn(f)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.__delitem__("labels"), "'labels' is missing"),
    (lambda f: (f.__delitem__("images"), f.create_dataset("images", data=np.zeros((12, 8, 8, 3), np.float32))),
     "'images' must be uint8"),
    (lambda f: f["labels"].__setitem__(0, 7), "labels span"),
    (lambda f: f.attrs.__setitem__("format", "other"), "not a galaxy_lightning prepared file"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, SPEC, {})
    _mutate(path, damage)
    with pytest.raises(DataError, match=message) as err:
        read_prepared(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    images, labels = arrays(200)
    path = write_prepared(tmp_path / "p.h5", images, labels, SPEC, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalaxyError, match="truncated or corrupt"):
        read_prepared(path)
    with pytest.raises(GalaxyError, match="not found"):
        read_info(tmp_path / "absent.h5")
    assert not provenance_matches(path, {})


# -- the input contract --------------------------------------------------------------------------
def test_input_spec_round_trips_and_checks_itself() -> None:
    spec = InputSpec(class_names=("a", "b"), channels=3, image_size=96, crop=96,
                     stretch={"kind": "asinh"})
    again = InputSpec.from_dict(spec.to_dict())
    assert again == spec and isinstance(spec.to_dict()["class_names"], list)
    for bad, message in (({"class_names": ["one"]}, "at least 2 classes"),
                         ({"resize": 64}, "resize=64 must equal image_size=96"),
                         ({"crop": 128}, "crop=128 without a resize must equal image_size=96"),
                         ({"scale": 0.0}, "scale=0.0 must be positive")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            InputSpec(**{**spec.to_dict(), **bad})
    with pytest.raises(ConfigError, match="unknown fields"):
        InputSpec.from_dict({**spec.to_dict(), "mean": [0.5]})


def test_every_source_makes_its_images_square_by_one_rule() -> None:
    """InputSpec.for_source is what the HDF5 and catalog sources (and Galaxy10) call."""
    names = ["a", "b"]
    square = InputSpec.for_source(names, 64, 64, 3, None, None, "f.h5")
    assert (square.image_size, square.crop, square.resize) == (64, None, None)
    cropped = InputSpec.for_source(names, 256, 256, 3, 96, None, "f.h5")
    assert (cropped.image_size, cropped.crop) == (96, 96)
    # not square: with a resize, the largest centred square is taken first
    wide = InputSpec.for_source(names, 60, 80, 1, None, 32, "f.h5", display="asinh")
    assert (wide.image_size, wide.crop, wide.resize, wide.display) == (32, 60, 32, {"stretch": "asinh"})
    with pytest.raises(ConfigError, match=r"f.h5: images are 60x80; set crop to a square size of at most 60"):
        InputSpec.for_source(names, 60, 80, 1, None, None, "f.h5")
    with pytest.raises(ConfigError, match=r"crop=100 is larger than the 60x80 images of f.h5"):
        InputSpec.for_source(names, 60, 80, 1, 100, None, "f.h5")
    with pytest.raises(ConfigError, match=r"resize=0 must be a positive integer or null"):
        InputSpec.for_source(names, 64, 64, 3, None, 0, "f.h5")
    with pytest.raises(ConfigError, match=r"display='log' must be null, 'linear' or 'asinh'"):
        InputSpec.for_source(names, 64, 64, 3, None, None, "f.h5", display="log")


def test_conform_repeats_the_training_geometry() -> None:
    spec = InputSpec(class_names=("a", "b"), channels=3, image_size=32, crop=64, resize=32)
    big = np.zeros((2, 100, 100, 3), np.uint8)
    big[:, 18:82, 18:82] = 200  # exactly the central 64 x 64 window
    out = spec.conform(big)
    assert out.shape == (2, 32, 32, 3) and (out == 200).all()
    ready = np.full((1, 32, 32, 3), 7, np.uint8)
    assert spec.conform(ready) is ready  # model-ready images pass untouched
    gray = spec.conform(np.full((1, 32, 32), 9, np.uint8))
    assert gray.shape == (1, 32, 32, 3) and (gray == 9).all()
    rgba = spec.conform(np.full((1, 32, 32, 4), 5, np.uint8))
    assert rgba.shape == (1, 32, 32, 3)
    with pytest.raises(SizeMismatch, match="is 40x50; the model takes 32x32"):
        spec.conform(np.zeros((1, 40, 50, 3), np.uint8))
    assert spec.conform(np.zeros((1, 40, 50, 3), np.uint8), allow_resize=True).shape == (1, 32, 32, 3)
    with pytest.raises(ConfigError, match="has 2 channels; the model takes 3"):
        spec.conform(np.zeros((1, 32, 32, 2), np.uint8))


def test_preprocess_is_the_one_conversion() -> None:
    spec = InputSpec(class_names=("a", "b"), channels=3, image_size=8, scale=0.5)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    x = Preprocess(spec)(images)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, images.permute(0, 3, 1, 2).float() * 0.5)
    assert images.dtype == torch.uint8  # the input is not modified


def test_version_1_prepared_files_are_still_read(tmp_path: Path) -> None:
    images, labels = arrays()
    path = write_prepared(tmp_path / "p.h5", images, labels, SPEC, {"params": {"crop": 8}})
    with h5py.File(path, "a") as f:  # make it look like format 1: no input spec
        del f.attrs["input_spec"]
        f.attrs["format_version"] = 1
    info = read_info(path)
    assert info.spec == InputSpec(class_names=tuple(NAMES), channels=3, image_size=8, crop=8)
    assert np.array_equal(read_prepared(path).images, images)


def test_optional_columns_round_trip(tmp_path: Path) -> None:
    images, labels = arrays(4)
    columns = {"id": np.array(["J1", "J2", "J3", "J4"]), "ra": np.arange(4.0),
               "dec": -np.arange(4.0), "split": np.array([0, 0, 1, 2]),
               "targets": np.full((4, 3), 1 / 3, np.float32)}
    data = read_prepared(write_prepared(tmp_path / "p.h5", images, labels, SPEC, {}, **columns))
    assert set(data.info.columns) == set(columns) and data.info.has_split
    for name, values in columns.items():
        assert np.array_equal(data.columns[name], values), name


# -- the DataModule ------------------------------------------------------------------------------
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
    with pytest.raises(ConfigError, match=message):
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


# -- augmentation ----------------------------------------------------------------------------
def test_dihedral_augmentation_is_exactly_a_symmetry() -> None:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (16, 12, 12, 3), dtype=torch.uint8, generator=gen)
    views = [dihedral(batch, k) for k in range(8)]
    assert len({v.numpy().tobytes() for v in views}) == 8  # 8 distinct symmetries
    for k, view in enumerate(views):  # applying all 8 views and inverting gives the batch back
        assert torch.equal(dihedral(view, DIHEDRAL_INVERSE[k]), batch)
    out = random_dihedral(batch, torch.Generator().manual_seed(1))
    for i in range(16):  # each image is one of its own 8 views, with the same pixel statistics
        assert any(torch.equal(out[i], v[i]) for v in views)
        assert torch.equal(out[i].flatten().sort().values, batch[i].flatten().sort().values)


def test_nchw_views_are_the_nhwc_symmetries() -> None:
    batch = torch.randint(0, 256, (4, 10, 10, 3), dtype=torch.uint8)
    nchw = batch.permute(0, 3, 1, 2)
    views = dihedral_views(nchw).view(8, 4, 3, 10, 10)
    for k in range(8):
        assert torch.equal(views[k], dihedral(batch, k).permute(0, 3, 1, 2))


def test_rotation_and_shift_follow_the_pixel_grid() -> None:
    x = torch.rand(3, 3, 16, 16)
    zeros = torch.zeros(3)
    assert torch.allclose(rotate_shift(x, zeros, torch.zeros(3, 2)), x, atol=1e-5)
    # a quarter turn counter-clockwise is the dihedral rotation k = 1, up to interpolation error
    quarter = rotate_shift(x, torch.full((3,), math.pi / 2), torch.zeros(3, 2))
    assert torch.allclose(quarter, dihedral(x, 1, (2, 3)), atol=1e-5)
    # whole-pixel shifts move the image right / down by that many pixels
    right = rotate_shift(x, zeros, torch.tensor([[1.0, 0.0]] * 3))
    assert torch.allclose(right[..., 1:], x[..., :-1], atol=1e-5)
    down = rotate_shift(x, zeros, torch.tensor([[0.0, 2.0]] * 3))
    assert torch.allclose(down[..., 2:, :], x[..., :-2, :], atol=1e-5)
    # a mirror then a quarter turn k is the dihedral symmetry 4 + k; only the asked images mirror
    for k in range(4):
        mirrored = rotate_shift(x, torch.full((3,), k * math.pi / 2), torch.zeros(3, 2),
                                torch.ones(3, dtype=torch.bool))
        assert torch.allclose(mirrored, dihedral(x, 4 + k, (2, 3)), atol=1e-5)
    some = rotate_shift(x, zeros, torch.zeros(3, 2), torch.tensor([True, False, True]))
    assert torch.allclose(some[1], x[1], atol=1e-5) and torch.allclose(some[2], x[2].flip(2), atol=1e-5)


def test_random_rotation_keeps_pixel_statistics() -> None:
    # A smooth, centred galaxy-like blob on a flat sky: rotating it keeps its flux and spread.
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    r2 = ((xx - 23.5) ** 2 + (yy - 23.5) ** 2 / 0.4)
    blob = (0.1 + torch.exp(-r2 / 60)).expand(32, 3, 48, 48).contiguous()
    out = random_rotate_shift(blob, max_shift=2.0, rotate=True,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == blob.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.mean((1, 2, 3)), blob.mean((1, 2, 3)), rtol=0.01)
    assert torch.allclose(out.std((1, 2, 3)), blob.std((1, 2, 3)), rtol=0.03)
    assert not torch.allclose(out, blob, atol=1e-2)  # the elongated blob really was turned


@pytest.mark.parametrize("augment", ["data.augment=[dihedral]", "data.augment=[rotate]",
                                     "data.augment=[shift]"])
def test_augmentation_keeps_labels(make_cfg: Callable[..., DictConfig], augment: str) -> None:
    cfg = make_cfg(augment)
    datamodule, module, trainer = build_and_prepare(cfg)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    trainer.state.stage = "train"  # trainer.training: augmentation on
    aug_images, aug_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(aug_labels, labels)
    assert aug_images.shape == (len(labels), 3, 32, 32) and aug_images.dtype == torch.float32
    plain = images.permute(0, 3, 1, 2).float() / 256
    assert not torch.equal(aug_images, plain)
    assert aug_images.mean().item() == pytest.approx(plain.mean().item(), rel=0.05)
    trainer.state.stage = "validate"  # no augmentation outside training
    val_images, _ = datamodule.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(val_images, plain)


def test_mixup_blends_images_and_targets_alike() -> None:
    # every pixel of image i holds its label, so a blend's pixels are its targets' mean label
    labels = torch.arange(32) % 4
    x = labels.float().view(-1, 1, 1, 1).expand(32, 3, 8, 8).contiguous()
    targets = torch.nn.functional.one_hot(labels, 4).float()
    augmentation = Augmentation([], mixup=0.4, seed=3)
    assert augmentation  # mixup alone is an augmentation: training batches go through it
    weights = []
    for _ in range(4):
        state = augmentation.generator.get_state()
        mixed, blended = augmentation.mix(x, targets)
        assert torch.allclose(blended.sum(1), torch.ones(32))
        assert torch.allclose(mixed.mean((1, 2, 3)), blended @ torch.arange(4.0), atol=1e-5)
        own = blended.gather(1, labels[:, None]).squeeze(1)
        assert (own >= 0.5 - 1e-6).all()  # each image stays the larger part of its blend
        assert (own < 1).any()  # and some were blended with another class
        weights.append(round(own.min().item(), 6))
        augmentation.generator.set_state(state)  # the same state blends the same way (resume)
        again = augmentation.mix(x, targets)
        assert torch.equal(again[0], mixed) and torch.equal(again[1], blended)
    assert len(set(weights)) == 4  # a new weight for every batch


def test_mixup_trains_against_blended_targets(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("data.augment=[dihedral]", "data.mixup=0.3")
    datamodule, module, trainer = build_and_prepare(cfg)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    trainer.state.stage = "train"
    x, out_labels, extras = datamodule.on_after_batch_transfer((images, labels), 0)
    blended = extras["targets"]
    assert torch.equal(out_labels, labels) and x.shape == (len(labels), 3, 32, 32)
    assert blended.shape == (len(labels), len(CLASS_NAMES))
    assert (blended.argmax(1) == labels).float().mean() > 0.9 and (blended.max(1).values < 1).any()
    trainer.state.stage = "validate"  # evaluation batches are the images as they are
    assert len(datamodule.on_after_batch_transfer((images, labels), 0)) == 2


def test_bad_mixup_options_are_reported(make_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=r"^data: mixup=-0.2 must be 0 \(off\)"):
        build(make_cfg("data.mixup=-0.2"))
    with pytest.raises(ConfigError, match=r"^data: mixup=0.2 blends class targets, not the vote"):
        build(make_cfg("data.mixup=0.2", "task=decision_tree", "data.source.tree=gz_decals_dr5"))


def test_bad_augmentation_options_are_reported(make_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=r"^data: max_shift=20"):
        build(make_cfg("data.augment=[shift]", "data.max_shift=20"))
    with pytest.raises(ConfigError, match=r"^data: augment=\['flip'\]: unknown \['flip'\]"):
        build(make_cfg("data.augment=[flip]"))


def test_augmentation_is_one_list_of_names() -> None:
    assert Augmentation([]).names == [] and not Augmentation("none")
    assert Augmentation("dihedral").names == ["dihedral"]  # a sweep's choice() passes one name
    # applied in a fixed order, whatever order the list gives
    assert Augmentation(["shift", "dihedral"]).names == ["dihedral", "shift"]
    batch = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    preprocess = Preprocess(InputSpec(class_names=("a", "b"), channels=3, image_size=16))
    # dihedral only: each image is exactly one of its 8 views (no interpolation)
    out = Augmentation(["dihedral"], seed=3)(batch, preprocess)
    views = [preprocess(dihedral(batch, k)) for k in range(8)]
    assert all(any(torch.equal(out[i], v[i]) for v in views) for i in range(6))
    # the same seed gives the same augmentation: the generator is the only source of randomness
    a = Augmentation(["dihedral", "rotate", "shift"], seed=1)(batch, preprocess)
    b = Augmentation(["dihedral", "rotate", "shift"], seed=1)(batch, preprocess)
    assert torch.equal(a, b)
    # with rotations, the symmetry is a mirror in the same resampling: about half the images of
    # a chiral shape (an F) come out mirrored, and none with rotations alone
    f = torch.zeros(24, 24)
    f[5:19, 8:11] = f[5:8, 8:17] = f[11:13, 8:14] = 1
    letter = (f * 200 + 20).to(torch.uint8)[None, :, :, None].expand(64, 24, 24, 3).contiguous()
    spec24 = Preprocess(InputSpec(class_names=("a", "b"), channels=3, image_size=24))
    x = spec24(letter[:1]).expand(72, -1, -1, -1)
    angles, still = torch.arange(72) * (2 * math.pi / 72), torch.zeros(72, 2)
    turns = rotate_shift(x, angles, still)
    mirrored_turns = rotate_shift(x, angles, still, torch.ones(72, dtype=torch.bool))

    def n_mirrored(names: list[str]) -> int:
        out = Augmentation(names, seed=0)(letter, spec24)
        def nearest(refs: torch.Tensor) -> torch.Tensor:
            return (out[:, None] - refs[None]).abs().flatten(2).mean(2).min(1).values
        return int((nearest(mirrored_turns) < nearest(turns)).sum())

    assert 16 < n_mirrored(["dihedral", "rotate"]) < 48
    assert n_mirrored(["rotate"]) == 0


