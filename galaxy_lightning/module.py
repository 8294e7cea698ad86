"""The one LightningModule: any classifier ``nn.Module`` plus the cross-entropy risk and the metrics.

The risk is the tutorial's ``R(w) = -(1/N) sum_i log f_{y_i}(x_i)`` computed from logits with
``F.cross_entropy`` (log-softmax, numerically stable); the softmax itself only appears in
``predict_step``. Hyperparameters are primitives (dicts of the model and optimizer configs, the
class names, the input geometry), so a checkpoint rebuilds its network with
``GalaxyClassifier.load_from_checkpoint(path)`` under torch's ``weights_only`` loading.

Logged metrics: ``train/loss`` (every ``log_every_n_steps``), ``train/acc`` (training accuracy
over the batches since the previous validation, as the tutorial measured it every 100
iterations), ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/loss``, ``test/acc`` and
per-class accuracies ``{val,test}/acc_class/<name>``; confusion-matrix images go to TensorBoard.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from galaxy_lightning.plots import confusion_matrix_figure, figure_to_array


def metric_slug(name: str) -> str:
    """'In-between Round Smooth' -> 'in_between_round_smooth' (for metric names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class _EvalMetrics(nn.Module):
    """Loss, accuracy overall and per class, and the confusion matrix of one evaluation split."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.loss = MeanMetric()
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        self.acc_per_class = MulticlassAccuracy(num_classes, average=None)
        self.confmat = MulticlassConfusionMatrix(num_classes)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss.update(loss, weight=len(labels))
        preds = logits.argmax(1)
        self.acc.update(preds, labels)
        self.acc_per_class.update(preds, labels)
        self.confmat.update(preds, labels)

    def compute_and_reset(self) -> dict[str, torch.Tensor]:
        out = {"loss": self.loss.compute(), "acc": self.acc.compute(),
               "acc_per_class": self.acc_per_class.compute(), "confmat": self.confmat.compute()}
        for metric in (self.loss, self.acc, self.acc_per_class, self.confmat):
            metric.reset()
        return out


class GalaxyClassifier(L.LightningModule):
    """Trains ``model`` (a config dict with ``_target_``) with ``optimizer`` (likewise).

    The checkpoint also carries what evaluation and prediction need to see data exactly as in
    training: ``data`` (the resolved data config: source, splits, seeds), the preprocessing of
    the source images (``crop``, then ``resize``), the pixel ``scale``, the input geometry
    (``in_channels``, ``image_size``) and the ``class_names``.
    """

    def __init__(self, model: dict[str, Any], optimizer: dict[str, Any], num_classes: int,
                 class_names: list[str], in_channels: int, image_size: int,
                 scale: float = 1.0 / 256.0, compile: bool = False,
                 data: dict[str, Any] | None = None, crop: int | None = None,
                 resize: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module = instantiate(model, in_channels=in_channels, num_classes=num_classes,
                                          image_size=image_size, _convert_="all")
        self.class_names = list(class_names)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = _EvalMetrics(num_classes)
        self.test_metrics = _EvalMetrics(num_classes)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives a resume from a checkpoint
        #: Results of the last test epoch (accuracy, per-class accuracy, confusion matrix).
        self.test_report: dict[str, Any] | None = None
        self._train_forward: Any = None

    def setup(self, stage: str) -> None:
        # Only the training forward is compiled: evaluation batches have other shapes and no
        # autograd, and would each cost a recompilation for little gain. A compiled function
        # (not a submodule) keeps the state_dict keys, so checkpoints are the same in both modes.
        if self.hparams.compile and stage == "fit" and self._train_forward is None:
            self._train_forward = torch.compile(self.net.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) of float images (N, C, H, W)."""
        return self.net(x)

    @staticmethod
    def risk(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Empirical risk -(1/N) sum log softmax(logits)[label] (cross-entropy from logits)."""
        return F.cross_entropy(logits, labels)

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = (self._train_forward or self.net)(images)
        loss = self.risk(logits, labels)
        self.train_acc.update(logits.detach().argmax(1), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_metrics.update(self.risk(logits, labels), logits, labels)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_metrics.update(self.risk(logits, labels), logits, labels)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities p(k|x) (softmax of the logits) for each image of the batch."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(images), dim=1)

    # -- epoch ends --------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute_and_reset()
        if self.trainer.sanity_checking:
            return
        improved = bool(results["acc"] > self.val_acc_best.compute()) \
            if self.val_acc_best.update_called else True
        self.val_acc_best.update(results["acc"])
        self.log("val/loss", results["loss"])
        self.log("val/acc", results["acc"], prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        self._log_per_class("val", results["acc_per_class"])
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute())
            self.train_acc.reset()
        if improved:
            self._log_confusion_image("val/confusion_matrix_at_best", results["confmat"])

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute_and_reset()
        self.log("test/loss", results["loss"])
        self.log("test/acc", results["acc"])
        self._log_per_class("test", results["acc_per_class"])
        self._log_confusion_image("test/confusion_matrix", results["confmat"])
        self.test_report = {
            "acc": float(results["acc"]),
            "loss": float(results["loss"]),
            "acc_per_class": {name: float(a) for name, a in
                              zip(self.class_names, results["acc_per_class"].tolist())},
            "confusion_matrix": results["confmat"].cpu().tolist(),
        }

    def _log_per_class(self, split: str, acc_per_class: torch.Tensor) -> None:
        for name, acc in zip(self.class_names, acc_per_class):
            self.log(f"{split}/acc_class/{metric_slug(name)}", acc)

    def _log_confusion_image(self, tag: str, confmat: torch.Tensor) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                image = figure_to_array(confusion_matrix_figure(
                    np.asarray(confmat.cpu()), self.class_names, title=tag))
                logger.experiment.add_image(tag, image, self.global_step, dataformats="HWC")

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return instantiate(self.hparams.optimizer, _partial_=True)(self.parameters())
