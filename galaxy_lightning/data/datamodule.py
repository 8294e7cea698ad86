"""The one DataModule: a prepared file held in memory as uint8 (or streamed from it, for sets
larger than memory: :mod:`galaxy_lightning.data.streaming`), batched by tensor indexing.

A *data source* (synthetic simulator, Galaxy10, a user's HDF5) only has to write the prepared
format (see :mod:`galaxy_lightning.data.prepared`); everything after that is shared:

- the whole file is read once into uint8 tensors (N, H, W, C): 12,600 x 96 x 96 x 3 is 348 MB;
- each split is a view selected by a permutation drawn from ``split_seed`` (or the file's own
  ``split`` array), so splits are reproducible;
- a batch is ``images[index]`` for an index tensor from :class:`EpochBatchSampler` (a seeded
  permutation per epoch, so a resumed run sees the same batches), with no per-sample Python;
- the uint8 -> float conversion (:class:`~galaxy_lightning.input_spec.Preprocess`, from the
  file's input spec) and the augmentation happen after the batch reaches the device
  (:meth:`GalaxyDataModule.on_after_batch_transfer`): 4x fewer bytes to move.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from galaxy_lightning.data.augment import Augmentation
from galaxy_lightning.data.prepared import (
    SPLIT_NAMES,
    PreparedInfo,
    read_info,
    read_labels,
    read_prepared,
)
from galaxy_lightning.data.streaming import H5Rows, block_order, decide_streaming
from galaxy_lightning.errors import ConfigError, DataError
from galaxy_lightning.input_spec import InputSpec, Preprocess


class DataSource(Protocol):
    """Anything that can produce a prepared file under a data directory."""

    def prepare(self, data_dir: str | Path, progress: bool = True) -> Path:
        """Create the prepared file if needed (idempotent) and return its path."""
        ...


class EpochBatchSampler:
    """Yields index tensors of whole batches; the order is a function of (seed, epoch) only.

    ``resume_at(epoch, batches)`` makes the next iteration over that epoch start after its first
    ``batches`` batches: how a run resumed in the middle of an epoch continues with the very
    batch it would have seen next."""

    def __init__(self, num_items: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 block: int | None = None) -> None:
        self.num_items = num_items
        #: streamed data: shuffle blocks of this many consecutive rows (and within a window of
        #: 8 batches) rather than single rows, so that reads from the file are large
        self.block = block
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last and num_items >= batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, batches)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _num_batches(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def __len__(self) -> int:
        if self.drop_last:  # training: every rank takes the same number of whole batches
            return self._num_batches() // self.world_size
        mine = len(range(self.rank, self.num_items, self.world_size))
        return -(-mine // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator: the order is drawn at the first batch, not when the loader creates its
        # iterator. Lightning creates that iterator on resume before it calls set_epoch, so an
        # eager order would be the previous epoch's (a run stopped at an epoch's last batch
        # would resume into an empty epoch and then train on the wrong permutation).
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = (block_order(self.num_items, self.block, gen, 8 * self.batch_size)
                     if self.block else torch.randperm(self.num_items, generator=gen))
        else:
            order = torch.arange(self.num_items)
        # With several processes (DDP) every rank draws the same permutation and takes its own
        # share, so shards are disjoint without communication: in training whole batches
        # r, r + world, ... (equal counts, as DDP needs); in evaluation every world-th image,
        # so that each rank has data whenever there are at least as many images as ranks.
        if self.drop_last:
            batches = order.split(self.batch_size)[: self._num_batches()]
            batches = batches[self.rank::self.world_size][: len(self)]
        else:
            batches = order[self.rank::self.world_size].split(self.batch_size)
        if self._resume is not None and self._resume[0] == self.epoch:
            batches = batches[self._resume[1]:]
        self._resume = None
        yield from batches


def _worker_context() -> str:
    """Reader processes start from a clean process (forkserver, else spawn), never by forking
    the training process: HDF5 is not safe across a fork of a process that has the file open,
    and the dataset they receive is pickled without its file handle."""
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _own_generator() -> torch.Generator:
    """A DataLoader draws a seed from a generator every time it starts an iteration; with its
    own, it leaves the global random state (dropout's) alone, so a resumed run, which starts its
    iteration at another moment, draws the same dropout masks as the uninterrupted run."""
    return torch.Generator().manual_seed(0)


class ResumableLoader(DataLoader):
    """A DataLoader of whole batches whose position in the epoch is saved in checkpoints.

    Lightning stores the state of a training loader that has ``state_dict``/``load_state_dict``
    and restores it before iterating again, so a run killed in the middle of an epoch resumes
    with the next batch of the same permutation instead of restarting the epoch. The position is
    the trainer's own count of completed batches (the loader itself runs ahead by the batches
    Lightning prefetches).
    """

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler,
                 completed: Callable[[], int], **workers: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, generator=_own_generator(),
                         **(workers or {"num_workers": 0}))
        self._completed = completed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._completed())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]))


class TensorBatches(Dataset):
    """Images and labels; ``self[index_tensor]`` is a whole batch: (images, labels), or
    (images, labels, extras) where extras maps ``targets`` (soft targets) and/or ``votes``
    (vote counts of a decision tree) to their rows. The images are a tensor in memory, or the
    rows of the prepared file read on demand (:class:`~galaxy_lightning.data.streaming.H5Rows`).
    ``columns`` keeps the split's per-row catalog identity (``id``, ``ra``, ``dec``) for outputs
    that name objects."""

    def __init__(self, images: torch.Tensor | H5Rows, labels: torch.Tensor,
                 targets: torch.Tensor | None = None,
                 columns: dict[str, np.ndarray] | None = None,
                 votes: torch.Tensor | None = None) -> None:
        self.images = images
        self.labels = labels
        self.targets = targets
        self.votes = votes
        self.columns = columns or {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[Any, ...]:
        index = index.to(self.labels.device, non_blocking=True)
        extras = {name: values[index] for name, values in
                  (("targets", self.targets), ("votes", self.votes)) if values is not None}
        if extras:
            return self.images[index], self.labels[index], extras
        return self.images[index], self.labels[index]


def stratified_folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """Fold number (0..folds-1) of each row: each class dealt round-robin over the folds in the
    given order, so folds are disjoint, cover every row, have sizes within one image of each
    other, and each holds every class in proportion."""
    order = np.argsort(labels, kind="stable")  # grouped by class, given order kept within a class
    fold = np.empty(len(labels), dtype=np.int64)
    fold[order] = np.arange(len(labels)) % folds
    return fold


def split_indices(labels: np.ndarray, split: np.ndarray | None, splits: Sequence[float],
                  seed: int, path: Path, folds: int | None = None, fold: int = 0
                  ) -> dict[str, torch.Tensor]:
    """Row indices of train, val and test: the file's ``split`` column, or a permutation drawn
    from ``seed`` cut into ``splits``. With ``folds`` the test split stays as it is and the
    train+val pool is cut into stratified folds: fold ``fold`` validates, the others train."""
    if split is not None:
        codes = torch.from_numpy(split.astype(np.int64))
        index = {name: torch.nonzero(codes == i).flatten() for i, name in enumerate(SPLIT_NAMES)}
    else:
        sizes = resolve_split_sizes(splits, len(labels), path)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        bounds = np.cumsum([0, *sizes])
        index = {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(SPLIT_NAMES)}
    if folds is not None:
        pool = torch.cat([index["train"], index["val"]])
        pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))]
        pool_labels = labels[pool.numpy()]
        counts = np.bincount(pool_labels)
        if (counts[counts > 0] < folds).any():
            raise ConfigError(f"folds={folds}: a class has {counts[counts > 0].min()} images in "
                              f"the train+val pool of {path}, fewer than the folds; lower folds")
        assignment = torch.from_numpy(stratified_folds(pool_labels, folds))
        index["train"], index["val"] = pool[assignment != fold], pool[assignment == fold]
    for name, idx in index.items():
        if len(idx) == 0 and split is not None:
            raise DataError(f"{path}: the file's 'split' array has no {name} rows")
        if len(idx) == 0:
            raise ConfigError(f"the {name} split of {path} is empty; raise its share in splits")
    return index


def resolve_split_sizes(splits: Sequence[float], total: int, path: Path) -> list[int]:
    """Turn ``splits`` (3 counts, or 3 fractions of the file) into counts that fit ``total``."""
    if len(splits) != 3:
        raise ConfigError(f"splits={list(splits)} must have 3 entries: train, val, test")
    if all(float(s).is_integer() and s >= 1 for s in splits):
        sizes = [int(s) for s in splits]
    elif all(0 < s < 1 for s in splits) and sum(splits) <= 1 + 1e-9:
        sizes = [int(round(s * total)) for s in splits]
    else:
        raise ConfigError(f"splits={list(splits)}: give 3 positive counts, or 3 fractions in "
                          "(0, 1) that sum to at most 1")
    if sum(sizes) > total:
        raise ConfigError(f"splits={sizes} needs {sum(sizes)} images but {path} holds {total}; "
                          "lower splits")
    for name, size in zip(SPLIT_NAMES, sizes):
        if size == 0:
            raise ConfigError(f"splits gives an empty {name} split for {path} ({total} images); "
                              "raise its size")
    return sizes


class GalaxyDataModule(L.LightningDataModule):
    """Train / validation / test splits of one prepared file, held in memory."""

    def __init__(self, source: DataSource, data_dir: str = "data", batch_size: int = 200,
                 eval_batch_size: int = 1000, splits: Sequence[float] = (10000, 1600, 1000),
                 split_seed: int = 0, shuffle_seed: int = 0, augment: str | Sequence[str] = (),
                 max_shift: float = 2.0, folds: int | None = None, fold: int = 0,
                 soft_targets: bool = False, overfit_batches: int = 0, test_only: bool = False,
                 device_resident: bool = False, in_memory: bool | str = True,
                 stream_workers: int | None = None, stream_block: int = 32,
                 votes: bool = False, mixup: float = 0.0) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value} must be a positive integer")
        if folds is not None and (not isinstance(folds, int) or folds < 2):
            raise ConfigError(f"folds={folds} must be an integer of at least 2 (or null)")
        if folds is not None and not 0 <= fold < folds:
            raise ConfigError(f"fold={fold} must be in 0..{folds - 1} for folds={folds}")
        self.source = source
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.splits = list(splits)
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.augmentation = Augmentation(augment, max_shift, seed=shuffle_seed, mixup=mixup)
        if self.augmentation.mixup and votes:
            raise ConfigError(f"mixup={mixup} blends class targets, not the vote counts that "
                              "task=decision_tree learns; use data.mixup=0 with that task")
        self.folds = folds
        self.fold = fold
        self.soft_targets = soft_targets
        self.votes = votes
        if not isinstance(overfit_batches, int) or overfit_batches < 0:
            raise ConfigError(f"overfit_batches={overfit_batches} must be 0 (off) or a number of "
                              "batches")
        self.overfit_batches = overfit_batches
        self.test_only = test_only
        self.device_resident = device_resident
        decide_streaming(in_memory, 0, device_resident and in_memory is False)  # checks the value
        self.in_memory = in_memory
        if stream_workers is not None and (not isinstance(stream_workers, int) or stream_workers < 0):
            raise ConfigError(f"stream_workers={stream_workers} must be 0 (read in the training "
                              "process), a number of reader processes, or null (up to 4)")
        self.stream_workers = stream_workers
        if not isinstance(stream_block, int) or stream_block < 1:
            raise ConfigError(f"stream_block={stream_block} must be a positive number of rows")
        self.stream_block = stream_block
        self.streamed = False
        self._path: Path | None = None
        self._split_data: dict[str, TensorBatches] = {}
        self.preprocess: Preprocess | None = None
        self.num_classes = 0

    # -- preparation -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Make sure the prepared file exists (simulate / download / convert once, then cached),
        and that the configured splits fit it (checked from the header, before any pixel loads).
        (Several processes may do this at once: the sources lock the file they write.)"""
        self._path = self.source.prepare(self.data_dir)
        info = read_info(self._path)
        labels = read_labels(self._path)
        if not self.test_only and len(np.unique(labels)) < 2:
            raise DataError(f"{self._path}: all {len(labels)} images are of one class "
                            f"({info.class_names[int(labels[0])]}); a classifier needs images of "
                            "at least two classes")
        self.preprocess = Preprocess(info.spec)
        self.num_classes = info.num_classes  # (read once: mixup's one-hot targets need it per batch)
        if not (self.test_only or info.has_split):
            resolve_split_sizes(self.splits, info.num_images, self._path)
        if self.votes and "votes" not in info.columns:
            raise ConfigError(f"{self._path} has no vote counts, which task=decision_tree learns; "
                              "use data whose source keeps a decision tree's votes "
                              "(data.source.tree=gz_decals_dr5 with data=catalog or "
                              "data=synthetic)")
        if self.soft_targets and "targets" not in info.columns:
            raise ConfigError(f"soft_targets=true but {self._path} has no soft targets (they come "
                              "from vote fractions: data=catalog with votes)")

    @property
    def path(self) -> Path:
        if self._path is None:
            self.prepare_data()
        assert self._path is not None
        return self._path

    @property
    def info(self) -> PreparedInfo:
        """Shape, classes and provenance of the data, from the file header."""
        return read_info(self.path)

    @property
    def spec(self) -> InputSpec:
        """The data's input contract (classes, geometry, scaling), from the file header."""
        return self.info.spec

    def setup(self, stage: str | None = None) -> None:
        if self._split_data:
            return
        if self.preprocess is None:
            self.prepare_data()
        info = self.info
        self.streamed = decide_streaming(
            self.in_memory, info.num_images * info.height * info.width * info.channels,
            self.device_resident)
        data = read_prepared(self.path, images=not self.streamed)
        labels = torch.from_numpy(data.labels)
        if self.test_only:  # evaluation of a whole file
            empty = torch.zeros(0, dtype=torch.int64)
            index = {"train": empty, "val": empty, "test": torch.arange(len(labels))}
        else:
            index = split_indices(data.labels, data.split, self.splits, self.split_seed, self.path,
                                  self.folds, self.fold)
        targets = torch.from_numpy(data.columns["targets"]) if self.soft_targets else None
        # vote counts: every split (evaluation measures each question against them)
        votes = torch.from_numpy(data.columns["votes"]) if self.votes else None
        identity = {k: v for k, v in data.columns.items() if k in ("id", "ra", "dec")}
        # Each split is one contiguous copy: batches then gather from a compact array. On a GPU,
        # device_resident keeps the uint8 splits on the device (1/4 the size of floats), so a
        # batch is gathered there and nothing crosses the bus per step.
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if (self.device_resident and trainer is not None) \
            else torch.device("cpu")
        if self.streamed:  # each split's rows in file order: batches read contiguous slabs
            shape = (info.height, info.width, info.channels)
            index = {name: idx.sort().values for name, idx in index.items()}
            self._split_data = {
                name: TensorBatches(H5Rows(self.path, idx.numpy(), shape), labels[idx].contiguous(),
                                      targets[idx].contiguous()
                                      if targets is not None and name == "train" else None,
                                      {k: v[idx.numpy()] for k, v in identity.items()},
                                      votes[idx].contiguous() if votes is not None else None)
                for name, idx in index.items()}
            return
        images = torch.from_numpy(data.images)
        self._split_data = {
            name: TensorBatches(images[idx].contiguous().to(device),
                                labels[idx].contiguous().to(device),
                                # soft targets train; evaluation measures against the labels
                                targets[idx].contiguous().to(device)
                                if targets is not None and name == "train" else None,
                                {k: v[idx.numpy()] for k, v in identity.items()},
                                votes[idx].contiguous().to(device) if votes is not None else None)
            for name, idx in index.items()}

    def teardown(self, stage: str | None = None) -> None:
        """Close the prepared file where streamed splits read it in this process."""
        for data in self._split_data.values():
            if isinstance(data.images, H5Rows):
                data.images.close()

    def train_batches_per_epoch(self, world_size: int = 1) -> int:
        """Training batches of one epoch on each of ``world_size`` processes, from the prepared
        file's header, labels and split column only (no pixels are read), so that a run can size
        its schedule before it starts (``length`` in the run config)."""
        if self.overfit_batches:
            return self.overfit_batches
        data = read_prepared(self.path, images=False)
        train = len(split_indices(data.labels, data.split, self.splits, self.split_seed,
                                  self.path, self.folds, self.fold)["train"])
        return len(EpochBatchSampler(train, self.batch_size, shuffle=True, drop_last=True,
                                     world_size=world_size))

    def split(self, name: str) -> TensorBatches:
        """The images (in memory, or read on demand) and labels of ``train``, ``val`` or
        ``test``."""
        self.setup()
        return self._split_data[name]

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        data = self.split(name)
        sampler = EpochBatchSampler(len(data), batch_size, shuffle=shuffle,
                                    seed=self.shuffle_seed, drop_last=shuffle, rank=rank,
                                    world_size=world,
                                    block=self.stream_block if self.streamed else None)
        # streamed training reads in worker processes; evaluation reads its batches in order,
        # contiguous slabs, in this process (no reader start-up at every validation)
        workers = (self._stream_workers(trainer) if self.streamed and shuffle
                   else {"num_workers": 0})
        if shuffle and trainer is not None:  # training: resumable in the middle of an epoch
            loop = trainer.fit_loop.epoch_loop.batch_progress
            return ResumableLoader(data, sampler, lambda: loop.current.completed, **workers)
        # batch_size=None: the sampler already yields whole batches and the dataset gathers them.
        return DataLoader(data, sampler=sampler, batch_size=None, generator=_own_generator(),
                          **workers)

    def _stream_workers(self, trainer: Any) -> dict[str, Any]:
        """DataLoader options of streamed training: reader processes (``stream_workers``; null:
        one per 4 cores of this rank, 0 to 4), each prefetching 4 batches, kept alive between
        epochs; pinned memory for non-blocking copies to a GPU."""
        count = self.stream_workers
        if count is None:  # one reader per 4 cores of this rank: readers take cores from compute
            # (on 2 cores a reader process cost 10% of the step rate, reading in the training
            # process none: `python -m galaxy_lightning.bench --only-stream`, README)
            world = trainer.world_size if trainer is not None else 1
            count = min(4, (os.cpu_count() or 1) // max(1, world) // 4)
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        if count == 0:
            return {"num_workers": 0, "pin_memory": cuda}
        return {"num_workers": count, "prefetch_factor": 4, "persistent_workers": True,
                "pin_memory": cuda, "multiprocessing_context": _worker_context()}

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.overfit_batches:
            raise ConfigError("trainer.overfit_batches replaces the data loader's sampler, which "
                              "this DataModule's whole-batch sampler does not allow; use "
                              "debug=overfit or data.overfit_batches=N")
        if self.overfit_batches:  # the same first batches, in the same order, every epoch
            train = self.split("train")
            n = min(len(train), self.overfit_batches * self.batch_size)
            subset = TensorBatches(train.images[:n], train.labels[:n],
                                   train.targets[:n] if train.targets is not None else None,
                                   votes=train.votes[:n] if train.votes is not None else None)
            sampler = EpochBatchSampler(n, self.batch_size, shuffle=False, drop_last=True)
            return DataLoader(subset, sampler=sampler, batch_size=None, num_workers=0,
                              generator=_own_generator())
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the augmentation's random state, so a resumed run augments
        its next batches exactly as the uninterrupted run would."""
        return {"augmentation_rng": self.augmentation.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "augmentation_rng" in state_dict:
            self.augmentation.generator.set_state(state_dict["augmentation_rng"])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 NHWC batch -> model input (augmented while training); labels (and soft targets)
        pass through."""
        images, *rest = batch
        assert self.preprocess is not None, "prepare_data() sets the preprocessing"
        trainer = getattr(self, "trainer", None)
        if not (self.augmentation and trainer is not None and trainer.training):
            return (self.preprocess(images), *rest)
        x = self.augmentation(images, self.preprocess)
        if not self.augmentation.mixup:
            return (x, *rest)
        labels, extras = rest[0], dict(rest[1]) if len(rest) > 1 else {}
        targets = extras.get("targets")
        if targets is None:
            targets = F.one_hot(labels, self.num_classes).to(x.dtype)
        x, extras["targets"] = self.augmentation.mix(x, targets)
        return (x, labels, extras)

    def examples(self, per_class: int = 8, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Up to ``per_class`` uint8 images of each class from a split (for image grids)."""
        data = self.split(split)
        labels = data.labels.cpu().numpy()  # (on the GPU with device_resident)
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                               for c in range(self.info.num_classes)])
        return data.images[torch.from_numpy(keep).to(data.images.device)].cpu().numpy(), labels[keep]
