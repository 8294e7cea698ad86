"""The one LightningModule: any classifier ``nn.Module`` plus the cross-entropy risk and the metrics.

The risk is the tutorial's ``R(w) = -(1/N) sum_i log f_{y_i}(x_i)`` computed from logits with
``F.cross_entropy`` (log-softmax, numerically stable), optionally with label smoothing. The
softmax itself appears only in evaluation and prediction.

With soft targets (a batch of images, labels and per-class target probabilities, e.g. volunteer
vote fractions) the risk is the cross-entropy against the target vector; accuracy is still
measured against the majority answer (the label).

Hyperparameters are the training choices only, as primitives (so checkpoints load under torch's
``weights_only``): the model, optimizer and scheduler configs, label smoothing, the data config
(to rebuild the test split) and the :class:`~galaxy_lightning.input_spec.InputSpec`, from which
the network is sized. Inference options (test-time augmentation, the calibration temperature)
are not hyperparameters: they are set per run, evaluation or prediction
(:meth:`GalaxyClassifier.set_inference`); the run's choice is kept in the checkpoint as the
default for later use. The temperature itself is fitted state, a buffer saved with the weights
(:mod:`galaxy_lightning.calibration`).

Metrics, logged under one name each (the same names appear in ``metrics.json``):
``train/loss``, ``train/acc`` (over the batches since the previous validation, as the tutorial
measured it), ``train/lr`` (by Lightning's ``LearningRateMonitor``), and per evaluation split
``{val,test}/loss``, ``/acc``, ``/ece`` (expected calibration error, 15 bins),
``/acc_class/<class>``, ``/ece_floor`` (the ECE a perfectly calibrated model would show on as
many images: :func:`ece_floor`), plus ``val/acc_best``, and with a calibrated model
``test/ece_uncalibrated`` (the ECE before temperature scaling). Non-scalar results (confusion
matrix, reliability bins) are kept in :attr:`GalaxyClassifier.summaries` for the figure
callback; ``test_step`` returns each batch's probabilities for it (the gallery of mistakes).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)
from torchmetrics.wrappers import ClasswiseWrapper

from galaxy_lightning.config import check_label_smoothing, construct
from galaxy_lightning.data.augment import dihedral_views
from galaxy_lightning.decision_tree import (
    DecisionTree,
    check_task,
    concentrations,
    fraction_intervals,
    predicted_fractions,
    question_mask,
    tree_risk,
)
from galaxy_lightning.errors import ConfigError, TrainingDiverged
from galaxy_lightning.input_spec import InputSpec, Preprocess

#: Confidence bins of the calibration error and the reliability diagram (equal widths on [0, 1]).
CALIBRATION_BINS = 15
#: Version of what this module writes into checkpoints (1: before the input spec).
CHECKPOINT_FORMAT = 2
#: Evaluation results that are not scalars: drawn by the figure callback, not logged as numbers.
SUMMARIES = ("confusion_matrix", "reliability")
#: A finite training loss above this multiple of a uniform guess's (ln K for K classes) is
#: flagged as exploding: no model that is learning is that confidently wrong.
EXPLODING_LOSS = 100.0
#: On an accelerator the loss is read back (a host sync) every this many steps and before every
#: validation, so that no checkpoint is written from diverged weights; on a CPU every step (free).
LOSS_CHECK_EVERY = 25
#: bins of predicted vote fraction for the calibration of a decision tree's predictions
FRACTION_BINS = 10

log = logging.getLogger(__name__)


def metric_slug(name: str) -> str:
    """'In-between Round Smooth' -> 'in_between_round_smooth' (for metric names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class ReliabilityBins(Metric):
    """Per confidence bin: the number of predictions, their summed confidence and the number
    correct (rows of a (3, bins) tensor), which is what a reliability diagram plots. (The expected
    calibration error itself comes from torchmetrics' ``MulticlassCalibrationError``.)"""

    full_state_update = False

    def __init__(self, n_bins: int = CALIBRATION_BINS) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.add_state("bins", torch.zeros(3, n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        confidence, preds = probs.max(1)
        confidence = confidence.double()
        index = (confidence * self.n_bins).long().clamp_(0, self.n_bins - 1)
        self.bins[0].index_add_(0, index, torch.ones_like(confidence))
        self.bins[1].index_add_(0, index, confidence)
        self.bins[2].index_add_(0, index, (preds == labels).double())

    def compute(self) -> torch.Tensor:
        return self.bins


def ece_floor(reliability: torch.Tensor) -> torch.Tensor:
    """The expected calibration error that a *perfectly* calibrated model with these confidences
    would show on this many images, from counting noise alone: in each confidence bin of ``n``
    predictions with mean confidence ``c``, the number correct is then Binomial(n, c), and the
    bin adds E|X/n - c| weighted by its share of the images (computed exactly from the binomial
    distribution). On a few hundred images this floor is several hundredths, so a measured ECE
    is only evidence of miscalibration by how far it exceeds the floor."""
    count, confidence = reliability[0].double(), reliability[1].double()
    total = count.sum()
    floor = torch.zeros((), dtype=torch.float64)
    for n, c in zip(count.tolist(), confidence.tolist()):
        if n < 1:
            continue
        n = int(n)
        p = min(max(c / n, 0.0), 1.0)
        x = torch.arange(n + 1, dtype=torch.float64)
        if p in (0.0, 1.0):
            continue  # a certain outcome has no counting noise
        pmf = torch.distributions.Binomial(n, torch.tensor(p, dtype=torch.float64)).log_prob(x).exp()
        floor += n / total * (pmf * (x / n - p).abs()).sum()
    return floor.float()


class QuestionMetrics(Metric):
    """Per question of a decision tree, what a Galaxy Zoo user checks: the mean absolute error
    of the predicted vote fractions (over galaxies whose question got at least ``min_votes``
    votes), the accuracy of the most-voted answer on the galaxies where the volunteers were
    also confident (the top answer has at least ``confident`` of the votes), and the calibration
    of the predicted fractions: every answer's predicted fraction falls in one of
    ``FRACTION_BINS`` equal bins, and the error is the count-weighted mean of |mean observed -
    mean predicted fraction| over the bins. A bin's mean observed fraction is an unbiased
    estimate of its galaxies' true fraction however few volunteers each had, so (unlike the
    MAE, which counts the volunteers' own scatter) a model that predicts the true fractions
    scores near 0 on enough galaxies."""

    full_state_update = False

    def __init__(self, tree: DecisionTree, confident: float, min_votes: int) -> None:
        super().__init__()
        self.tree, self.confident, self.min_votes = tree, confident, min_votes
        q = len(tree.questions)
        for name in ("abs_error", "asked", "correct", "confident_n"):
            self.add_state(name, torch.zeros(q, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("bin_count", "bin_predicted", "bin_observed"):
            self.add_state(name, torch.zeros(q, FRACTION_BINS, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, votes: torch.Tensor) -> None:
        for j, (a, b) in enumerate(self.tree.slices):
            k = votes[:, a:b].double()
            n = k.sum(1)
            asked = n >= self.min_votes
            observed = k / n.clamp(min=1)[:, None]
            error = (predicted[:, a:b].double() - observed).abs().mean(1)
            confident = asked & (observed.max(1).values >= self.confident)
            right = predicted[:, a:b].argmax(1) == observed.argmax(1)
            self.abs_error[j] += error[asked].sum()
            self.asked[j] += asked.sum()
            self.correct[j] += (right & confident).sum()
            self.confident_n[j] += confident.sum()
            p, o = predicted[asked, a:b].double().flatten(), observed[asked].flatten()
            bins = (p * FRACTION_BINS).long().clamp(0, FRACTION_BINS - 1)
            self.bin_count[j].index_add_(0, bins, torch.ones_like(p))
            self.bin_predicted[j].index_add_(0, bins, p)
            self.bin_observed[j].index_add_(0, bins, o)

    def compute(self) -> dict[str, torch.Tensor]:
        """``<question>/mae``, ``<question>/acc_confident``, ``<question>/n_confident``,
        ``<question>/calibration_error`` (NaN where no galaxy qualifies), and ``mae``, the mean
        over questions, and ``calibration_error``, over every answer of every question."""
        mae = self.abs_error / self.asked
        acc = self.correct / self.confident_n
        gap = (self.bin_observed - self.bin_predicted).abs()
        calibration = gap.sum(1) / self.bin_count.sum(1)
        out: dict[str, torch.Tensor] = {}
        for j, q in enumerate(self.tree.questions):
            out[f"{q.name}/mae"] = mae[j].float()
            out[f"{q.name}/acc_confident"] = acc[j].float()
            out[f"{q.name}/n_confident"] = self.confident_n[j].float()
            out[f"{q.name}/calibration_error"] = calibration[j].float()
        out["mae"] = torch.nanmean(mae).float()
        out["calibration_error"] = (gap.sum() / self.bin_count.sum()).float()
        return out


def evaluation_metrics(class_names: list[str]) -> MetricCollection:
    """The metrics of one evaluation split, all updated with (probabilities, labels)."""
    k = len(class_names)
    return MetricCollection({
        "acc": MulticlassAccuracy(k, average="micro"),
        "acc_class": ClasswiseWrapper(MulticlassAccuracy(k, average=None),
                                      labels=[metric_slug(n) for n in class_names],
                                      prefix="acc_class/"),
        "ece": MulticlassCalibrationError(k, n_bins=CALIBRATION_BINS, norm="l1"),
        "confusion_matrix": MulticlassConfusionMatrix(k),
        "reliability": ReliabilityBins(CALIBRATION_BINS),
    }, compute_groups=False)


class GalaxyClassifier(L.LightningModule):
    """Trains the network that ``model`` (a config dict with ``_target_``) describes, sized from
    ``input_spec``, with ``optimizer`` and an optional ``scheduler`` (``_partial_`` configs).

    ``data`` (the resolved data config) rides along so that evaluation can rebuild the run's test
    split. ``compile`` (a performance setting, not saved) compiles the training forward.
    """

    def __init__(self, model: dict[str, Any], input_spec: dict[str, Any],
                 optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None,
                 label_smoothing: float = 0.0, data: dict[str, Any] | None = None,
                 compile: bool = False, task: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_label_smoothing(label_smoothing)
        # logger=False: the run's whole config, not these, goes to the loggers' hparams views.
        self.save_hyperparameters(ignore=["compile"], logger=False)
        self.spec = InputSpec.from_dict(input_spec)
        self.task = check_task(task)
        #: task=decision_tree: the network has one output group per question of the data's tree
        #: after the class logits, trained on the vote counts (:mod:`~..decision_tree`)
        self.tree: DecisionTree | None = None
        if self.task["name"] == "decision_tree":
            if self.spec.tree is None:
                raise ConfigError("task=decision_tree needs data with a decision tree's vote "
                                  "counts (data.source.tree=gz_decals_dr5)")
            self.tree = DecisionTree.from_dict(self.spec.tree)
            #: the questions whose votes train the network (task.questions; default: all)
            self.learned = question_mask(self.tree, self.task["questions"])
        extra = self.tree.num_answers if self.tree is not None else 0
        self.net: nn.Module = construct(model, "model", in_channels=self.spec.channels,
                                        num_classes=self.spec.num_classes + extra,
                                        image_size=self.spec.image_size)
        self.preprocess = Preprocess(self.spec)
        self.class_names = list(self.spec.class_names)
        self.train_acc = MulticlassAccuracy(self.spec.num_classes, average="micro")
        self.train_acc.persistent(True)  # a run stopped between validations resumes its count
        metrics = evaluation_metrics(self.class_names)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        if self.tree is not None:
            questions = QuestionMetrics(self.tree, self.task["confident"], self.task["min_votes"])
            self.val_questions, self.test_questions = questions, questions.clone()
            self.val_tree_loss, self.test_tree_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives a resume from a checkpoint
        #: Non-scalar results of the latest epoch of each evaluation split ("val", "test").
        self.summaries: dict[str, dict[str, torch.Tensor]] = {}
        self.test_ece_uncalibrated = MulticlassCalibrationError(self.spec.num_classes,
                                                                n_bins=CALIBRATION_BINS, norm="l1")
        #: Divides the logits when ``calibrated`` (fitted on validation data after training).
        self.register_buffer("temperature", torch.ones(()))
        self.tta = False
        self.calibrated = False
        #: The highest training loss of this process's fit, and the first step at which it
        #: exploded (None: never), for metrics.json; the worst loss since the last check.
        self.loss_peak: float | None = None
        self.exploding_at_step: int | None = None
        self._worst_loss: torch.Tensor | None = None
        self._first_loss: float | None = None
        #: The checkpoint whose weights the module holds, set by whoever loads them (the run's
        #: test, evaluation); ``metrics.json`` names it. None: weights of this process's fit.
        self.weights_from: str | None = None
        self._compile = compile
        self._train_forward: Any = None

    # -- inference options (not hyperparameters) -------------------------------------------------
    def set_inference(self, tta: bool | None = None, calibrated: bool | None = None
                      ) -> GalaxyClassifier:
        """``tta``: evaluate and predict with the softmax averaged over the 8 symmetric views of
        each image. Validation during training stays single-view: it picks checkpoints, and 8x
        the cost buys nothing there. ``calibrated``: divide the logits by the fitted
        ``temperature``. ``None`` leaves a setting as it is."""
        if tta is not None:
            self.tta = bool(tta)
        if calibrated is not None:
            self.calibrated = bool(calibrated)
        return self

    @property
    def inference(self) -> dict[str, bool]:
        return {"tta": self.tta, "calibrated": self.calibrated}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["galaxy_lightning"] = {"format": CHECKPOINT_FORMAT, "inference": self.inference}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written before temperature scaling existed has no temperature: 1 (none).
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))

    def setup(self, stage: str) -> None:
        # Only the training forward is compiled: evaluation batches have other shapes and no
        # autograd, and would each cost a recompilation for little gain. A compiled function
        # (not a submodule) keeps the state_dict keys, so checkpoints are the same in both modes.
        if self._compile and stage == "fit" and self._train_forward is None:
            self._train_forward = torch.compile(self.net.forward)

    # -- the model as a function -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) of model input (N, C, H, W) (what :class:`Preprocess` makes); a
        decision-tree model's question outputs are left out (:meth:`split_outputs`)."""
        return self.split_outputs(self.net(x))[0]

    def split_outputs(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's outputs as (class logits (N, K), the tree's outputs (N, A) or None)."""
        if self.tree is None:
            return outputs, None
        k = self.spec.num_classes
        return outputs[:, :k], outputs[:, k:]

    def view_logits(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits (V, N, K) of the views of each image: V = 1, or the 8 symmetric views (rotations
        by 90 degrees and flips) with ``tta``."""
        if not tta:
            return self(x).float()[None]
        return self(dihedral_views(x)).float().unflatten(0, (8, -1))  # no fixed batch: exportable

    @staticmethod
    def combine_views(logits: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
        """log of the mean over views of softmax(logits / temperature), (N, K), without underflow."""
        views = F.log_softmax(logits / temperature, dim=-1)
        return torch.logsumexp(views, dim=0) - math.log(len(views))

    def log_probs(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """log p(k|x), (N, K), of model input: the log-softmax of the logits (divided by the
        temperature when calibrated), or with ``tta`` the log of the softmax averaged over the 8
        symmetric views of each image."""
        return self.combine_views(self.view_logits(x, tta),
                                  self.temperature if self.calibrated else 1.0)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """p(k|x), (N, K), of uint8 images (N, S, S, C) already in the training geometry, with
        this module's inference options: what prediction and export compute."""
        return self.log_probs(self.preprocess(images.to(self.device)), self.tta).exp()

    @torch.no_grad()
    def answer_fractions(self, images: torch.Tensor, level: float = 0.9
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decision-tree model's predicted vote fraction of every answer of uint8 images
        (N, S, S, C), and the central ``level`` interval of each (from the Dirichlet's
        concentrations; with ``task.loss=fractions`` the interval is the point itself)."""
        assert self.tree is not None, "only task=decision_tree models answer the questions"
        _, outputs = self.split_outputs(self.net(self.preprocess(images.to(self.device))).float())
        assert outputs is not None
        fractions = predicted_fractions(outputs, self.tree, self.task["loss"]).cpu()
        if self.task["loss"] != "dirichlet":
            return fractions, fractions, fractions
        return (fractions, *fraction_intervals(concentrations(outputs), self.tree, level))

    @staticmethod
    def risk(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Empirical risk -(1/N) sum log softmax(logits)[label] (cross-entropy from logits), or
        with ``targets`` of shape (N, K) (class probabilities, e.g. vote fractions)
        -(1/N) sum_i sum_k t_ik log softmax(logits)_ik.

        With ``label_smoothing`` = e the target is mixed with e / K uniform: a penalty on
        over-confident logits (used for training only; reported losses are the plain risk)."""
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    # -- steps -------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Any, ...], batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        extras = batch[2] if len(batch) > 2 else {}
        targets = extras.get("targets", labels)  # soft targets, when the data has them
        logits, tree_outputs = self.split_outputs((self._train_forward or self.net)(images))
        loss = self.risk(logits, targets, self.hparams.label_smoothing)
        if self.tree is not None:
            tree_loss = tree_risk(tree_outputs, extras["votes"], self.tree, self.task["loss"],
                                  self.learned)
            self.log("train/tree_loss", tree_loss, on_step=True, on_epoch=False)
            loss = self.task["class_weight"] * loss + tree_loss
        self.train_acc.update(logits.detach().argmax(1), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    # -- divergence: a NaN stops the run at once, an exploding loss is flagged ----------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach()
        # the worst loss since the last check, kept on the device (torch.maximum keeps a NaN)
        self._worst_loss = loss if self._worst_loss is None else torch.maximum(self._worst_loss, loss)
        if loss.device.type == "cpu" or self.trainer.global_step % LOSS_CHECK_EVERY == 0:
            self._check_loss()

    def on_validation_start(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":
            self._check_loss()

    def _check_loss(self) -> None:
        """Raise :class:`TrainingDiverged` for a non-finite loss since the last check; record the
        peak loss and the first step where it exploded (``metrics.json``, a warning line)."""
        if self._worst_loss is None:
            return
        loss, self._worst_loss = float(self._worst_loss), None
        step = self.trainer.global_step
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged: the loss became {loss} by step {step}, and "
                                   f"the run stopped; {self._divergence_fix()}")
        self.loss_peak = loss if self.loss_peak is None else max(self.loss_peak, loss)
        guess = math.log(self.spec.num_classes)
        if self.tree is not None:
            # the questions' likelihood has no uniform-guess value (it grows with the number of
            # votes): the loss of the run's first checked steps stands in for it
            if self._first_loss is None:
                self._first_loss = loss
            guess = max(guess, self._first_loss)
        if loss > EXPLODING_LOSS * guess and self.exploding_at_step is None:
            self.exploding_at_step = step
            log.warning("the training loss is exploding: %.3g at step %d, against %.3g for a "
                        "uniform guess; %s", loss, step, guess, self._divergence_fix())

    def _divergence_fix(self) -> str:
        """What to change, and which checkpoint holds weights from before the divergence."""
        optimizer = self.hparams.optimizer
        fix = f"start again with a lower optimizer.lr (now {optimizer.get('lr')})"
        if optimizer.get("momentum"):
            fix += f" or optimizer.momentum (now {optimizer['momentum']})"
        saved = [Path(c.dirpath) / "last.ckpt" for c in self.trainer.checkpoint_callbacks
                 if getattr(c, "dirpath", None)]  # last.ckpt: rewritten at every validation
        saved = [p for p in saved if p.is_file()]
        return fix + (f"; the last checkpoint, written before it: {saved[0]}" if saved else "")

    def _evaluate(self, stage: str, batch: tuple[Any, ...], tta: bool) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        votes = batch[2].get("votes") if len(batch) > 2 else None
        if self.tree is not None and votes is not None:  # each question against the votes
            logits, tree_outputs = self.split_outputs(self.net(images).float())
            getattr(self, f"{stage}_tree_loss").update(
                tree_risk(tree_outputs, votes, self.tree, self.task["loss"], self.learned),
                weight=len(votes))
            getattr(self, f"{stage}_questions").update(
                predicted_fractions(tree_outputs, self.tree, self.task["loss"]), votes)
            logits = self.view_logits(images, tta) if tta else logits[None]
        else:
            logits = self.view_logits(images, tta)
        log_probs = self.combine_views(logits, self.temperature if self.calibrated else 1.0)
        probs = log_probs.exp()
        getattr(self, f"{stage}_loss").update(F.nll_loss(log_probs, labels), weight=len(labels))
        getattr(self, f"{stage}_metrics").update(probs, labels)
        if stage == "test" and self.calibrated:
            self.test_ece_uncalibrated.update(self.combine_views(logits).exp(), labels)
        return probs

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate("val", batch, tta=False)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The batch's probabilities go to the callbacks (the gallery of confident mistakes)."""
        return self._evaluate("test", batch, tta=self.tta)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities p(k|x) of a batch of model input (with the inference options)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.log_probs(images, self.tta).exp()

    # -- epoch ends --------------------------------------------------------------------------------
    def _compute(self, stage: str) -> dict[str, torch.Tensor]:
        """Scalars of a finished evaluation epoch (logged), its summaries kept; metrics reset."""
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        results = metrics.compute()
        results[f"{stage}/loss"] = loss.compute()
        metrics.reset()
        loss.reset()
        self.summaries[stage] = {name: results.pop(f"{stage}/{name}") for name in SUMMARIES}
        results[f"{stage}/ece_floor"] = ece_floor(self.summaries[stage]["reliability"])
        if self.tree is not None and getattr(self, f"{stage}_questions").update_called:
            questions, tree_loss = getattr(self, f"{stage}_questions"), \
                getattr(self, f"{stage}_tree_loss")
            results.update({f"{stage}/tree/" + "/".join(map(metric_slug, k.split("/"))): v
                            for k, v in questions.compute().items()})
            results[f"{stage}/tree_loss"] = tree_loss.compute()
            questions.reset()
            tree_loss.reset()
        return results

    def on_validation_epoch_end(self) -> None:
        results = self._compute("val")
        if self.trainer.sanity_checking:
            return
        acc = results.pop("val/acc")
        self.val_acc_best.update(acc)
        self.log_dict(results)
        self.log("val/acc", acc, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute())
            self.train_acc.reset()

    def on_test_epoch_end(self) -> None:
        results = self._compute("test")
        if self.calibrated:
            results["test/ece_uncalibrated"] = self.test_ece_uncalibrated.compute()
            results["test/temperature"] = self.temperature.detach().clone()
            self.test_ece_uncalibrated.reset()
        self.log_dict(results)

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The optimizer and its schedule, stepped every step; a constant schedule without one, so
        that ``train/lr`` is always the learning rate of the step. Torch's own checks of the
        settings (a negative rate, betas out of range) are reported as config errors."""
        optimizer = _construct_torch(self.hparams.optimizer, "optimizer", params=self.parameters())
        if self.hparams.scheduler:
            scheduler = _construct_torch(self.hparams.scheduler, "scheduler", optimizer=optimizer)
        else:
            scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1,
                                 "name": "train/lr"}}


def _construct_torch(node: dict[str, Any], key: str, **filled_in: Any) -> Any:
    """:func:`construct` a torch optimizer or scheduler, whose constructors signal invalid settings
    (a negative rate, betas out of range, a schedule of no steps) with ``ValueError``."""
    try:
        return construct(node, key, **filled_in)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{key}: {node['_target_']} rejects its settings: {err}; fix the "
                          f"{key}.* values") from None
