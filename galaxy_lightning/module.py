"""The one LightningModule: any classifier ``nn.Module`` plus the cross-entropy risk and the metrics.

The risk is the tutorial's ``R(w) = -(1/N) sum_i log f_{y_i}(x_i)`` computed from logits with
``F.cross_entropy`` (log-softmax, numerically stable), optionally with label smoothing; the
softmax itself only appears in evaluation and ``predict_step``, where ``tta`` averages it over
the 8 symmetric views of each image. Hyperparameters are primitives (dicts of the model,
optimizer and scheduler configs, the class names, the input geometry), so a checkpoint rebuilds
its network with ``GalaxyClassifier.load_from_checkpoint(path)`` under torch's ``weights_only``
loading. An optional ``scheduler`` (a ``_partial_`` config taking the optimizer) steps every step.

Logged metrics: ``train/loss`` (every ``log_every_n_steps``), ``train/lr`` (with a schedule),
``train/acc`` (training accuracy over the batches since the previous validation, as the tutorial
measured it every 100 iterations), ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/loss``,
``test/acc``, per-class accuracies ``{val,test}/acc_class/<name>`` and the expected calibration
error ``{val,test}/ece`` (15 equal-width confidence bins). Confusion-matrix images go to
TensorBoard; the test's reliability bins go to ``test_report`` (plotted by RunArtifacts).
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from galaxy_lightning.data.augment import dihedral_views
from galaxy_lightning.plots import confusion_matrix_figure, figure_to_array

#: Confidence bins of the calibration error and the reliability diagram (equal widths on [0, 1]).
CALIBRATION_BINS = 15


def metric_slug(name: str) -> str:
    """'In-between Round Smooth' -> 'in_between_round_smooth' (for metric names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class ReliabilityBins(Metric):
    """Per confidence bin: the number of predictions, their summed confidence and the number
    correct, which is what a reliability diagram plots. (The expected calibration error itself
    comes from torchmetrics' ``MulticlassCalibrationError``, with the same bins.)"""

    full_state_update = False

    def __init__(self, n_bins: int = CALIBRATION_BINS) -> None:
        super().__init__()
        self.n_bins = n_bins
        for name in ("count", "confidence", "correct"):
            self.add_state(name, torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        confidence, preds = probs.max(1)
        confidence = confidence.double()
        index = (confidence * self.n_bins).long().clamp_(0, self.n_bins - 1)
        self.count.index_add_(0, index, torch.ones_like(confidence))
        self.confidence.index_add_(0, index, confidence)
        self.correct.index_add_(0, index, (preds == labels).double())

    def compute(self) -> dict[str, list[float]]:
        return {"count": self.count.tolist(), "confidence": self.confidence.tolist(),
                "correct": self.correct.tolist()}


class _EvalMetrics(nn.Module):
    """Loss, accuracy overall and per class, the confusion matrix and the calibration (expected
    calibration error and reliability bins) of one evaluation split."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.loss = MeanMetric()
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        self.acc_per_class = MulticlassAccuracy(num_classes, average=None)
        self.confmat = MulticlassConfusionMatrix(num_classes)
        self.ece = MulticlassCalibrationError(num_classes, n_bins=CALIBRATION_BINS, norm="l1")
        self.reliability = ReliabilityBins(CALIBRATION_BINS)

    def update(self, loss: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss.update(loss, weight=len(labels))
        probs = probs.float()
        preds = probs.argmax(1)
        self.acc.update(preds, labels)
        self.acc_per_class.update(preds, labels)
        self.confmat.update(preds, labels)
        self.ece.update(probs, labels)
        self.reliability.update(probs, labels)

    def compute_and_reset(self) -> dict[str, Any]:
        metrics = (self.loss, self.acc, self.acc_per_class, self.confmat, self.ece, self.reliability)
        out = dict(zip(("loss", "acc", "acc_per_class", "confmat", "ece", "reliability"),
                       (m.compute() for m in metrics)))
        for metric in metrics:
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
                 resize: int | None = None, scheduler: dict[str, Any] | None = None,
                 label_smoothing: float = 0.0, tta: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        # hparams.tta (test-time augmentation): test and predict with the mean softmax over the 8
        # symmetric views. Validation during training stays single-view: it picks checkpoints,
        # and 8x cost there buys nothing. Evaluation may switch it after loading a checkpoint.
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

    def log_probs(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """log p(k|x), (N, K): log-softmax of the logits, or with ``tta`` the log of the softmax
        averaged over the 8 symmetric views of each image (rotations by 90 degrees and flips)."""
        if not tta:
            return F.log_softmax(self(x).float(), dim=1)
        views = F.log_softmax(self(dihedral_views(x)).float(), dim=1).view(8, len(x), -1)
        return torch.logsumexp(views, dim=0) - math.log(8)  # log of the mean, without underflow

    @staticmethod
    def risk(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Empirical risk -(1/N) sum log softmax(logits)[label] (cross-entropy from logits).

        With ``label_smoothing`` = e the target is (1 - e) one-hot + e / K uniform: a penalty on
        over-confident logits (used for training only; reported losses are the plain risk)."""
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = (self._train_forward or self.net)(images)
        loss = self.risk(logits, labels, self.hparams.label_smoothing)
        self.train_acc.update(logits.detach().argmax(1), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        if self.hparams.scheduler:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        log_probs = self.log_probs(images)
        self.val_metrics.update(F.nll_loss(log_probs, labels), log_probs.exp(), labels)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        log_probs = self.log_probs(images, self.hparams.tta)
        self.test_metrics.update(F.nll_loss(log_probs, labels), log_probs.exp(), labels)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities p(k|x) for each image of the batch (averaged over the 8 views
        with ``tta``)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.log_probs(images, self.hparams.tta).exp()

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
        self.log("val/ece", results["ece"])
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
        self.log("test/ece", results["ece"])
        self._log_per_class("test", results["acc_per_class"])
        self._log_confusion_image("test/confusion_matrix", results["confmat"])
        self.test_report = {
            "acc": float(results["acc"]),
            "loss": float(results["loss"]),
            "acc_per_class": {name: float(a) for name, a in
                              zip(self.class_names, results["acc_per_class"].tolist())},
            "confusion_matrix": results["confmat"].cpu().tolist(),
            "ece": float(results["ece"]),
            "reliability": results["reliability"],
            "tta": bool(self.hparams.tta),
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
    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer, _partial_=True)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler, _partial_=True)(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
