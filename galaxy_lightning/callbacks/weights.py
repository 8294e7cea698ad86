"""The weights that validation, checkpoints and the test judge: BatchNorm statistics recomputed
for them, and an exponential moving average of them."""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import update_bn

from galaxy_lightning.errors import ConfigError


class BatchNormStatistics(L.Callback):
    """Before every validation, recompute the BatchNorm running statistics for the weights about
    to be evaluated, from ``images`` training images (``torch.optim.swa_utils.update_bn``: a
    plain average over those batches, in training mode, without gradients).

    Why: BatchNorm evaluates with running statistics, an exponential average over the last ~10
    training batches (momentum 0.1). While the weights still move fast (Adam at a high rate),
    those statistics describe the network of several steps ago, and validation accuracy jumps by
    tens of points between checks although the weights are good (measured on the simulator with
    1,500 training images: up to 18 points between checks with the running statistics, 4.5 with
    recomputed ones; README, "Training on small real data sets"). Recomputed statistics match
    the weights exactly, so validation, checkpoint choice and the test judge the model itself.

    Place it after ``EMAWeightAveraging`` in the callbacks: that one swaps the averaged weights in
    when validation starts, and these statistics must be those of the averaged weights.
    """

    def __init__(self, images: int = 2048, batch_size: int = 256) -> None:
        if not (isinstance(images, int) and isinstance(batch_size, int)) or images < 1 \
                or batch_size < 1:
            raise ConfigError(f"images={images} and batch_size={batch_size} must be positive "
                              "integers")
        self.images = images
        self.batch_size = batch_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mine = trainer.callbacks.index(self)
        if any(isinstance(c, WeightAveraging) for c in trainer.callbacks[mine + 1:]):
            raise ConfigError("BatchNormStatistics must come after the weight averaging callback "
                              "(the averaged weights are swapped in first, then their statistics "
                              "computed): list bn_statistics after ema")

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split"):
            return
        train = datamodule.split("train")
        if len(train) == 0:
            return
        # the same images every time (the first of a fixed permutation): deterministic statistics
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        index = order[: self.images].to(train.images.device)
        images = train.images[index]
        batches = (datamodule.preprocess(images[i:i + self.batch_size].to(pl_module.device))
                   for i in range(0, len(images), self.batch_size))
        was_training = pl_module.training
        # update_bn runs the network in training mode, where dropout draws from the global random
        # generators; forked, they are left as they were, so recomputing statistics changes no
        # later training step (a run with it trains exactly the weights of a run without it)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            update_bn(batches, pl_module)
        pl_module.train(was_training)


class WeightAverage(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging``, with an average that is the current model until it has
    started (``update_starting_at_step``).

    Lightning's callback copies the initial weights when fit begins and swaps that copy in for
    every validation, checkpoint and the end of training, whether or not averaging has begun: a
    validation before the start would judge the random initial weights (and could be checkpointed
    as them), and a run shorter than the start would end with its initial weights. Here, before
    the start, validation judges the current model itself (nothing is swapped), and checkpoints
    and the end of training take the current model as the average: a run whose averaging has not
    started behaves exactly as one without it."""

    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def _follow_current(self, pl_module: L.LightningModule) -> None:
        average = self._average_model
        if average is None or self._started():
            return
        for mine, current in zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                                 itertools.chain(pl_module.parameters(), pl_module.buffers())):
            mine.data.copy_(current.data)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._started()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_swapped", False):
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._follow_current(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow_current(pl_module)
        super().on_train_end(trainer, pl_module)
