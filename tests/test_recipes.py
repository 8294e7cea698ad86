"""Beyond the tutorial: the models, augmentation, test-time augmentation, schedules, label
smoothing, calibration and the recommended experiment."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.functional.classification import multiclass_calibration_error

from galaxy_lightning.config import validate_config
from galaxy_lightning.data.augment import (
    DIHEDRAL_INVERSE,
    dihedral,
    dihedral_views,
    random_dihedral,
    random_rotate_shift,
    rotate_shift,
)
from galaxy_lightning.errors import GalaxyError
from galaxy_lightning.models import BNCNN, ResNet, TutorialCNN
from galaxy_lightning.module import CALIBRATION_BINS, GalaxyClassifier, ReliabilityBins
from galaxy_lightning.schedules import warmup_cosine
from galaxy_lightning.sweep import group_by_config, markdown_table
from galaxy_lightning.train import build, train

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}
TUTORIAL = {"_target_": "galaxy_lightning.models.TutorialCNN"}


# -- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TutorialCNN, BNCNN, ResNet])
@pytest.mark.parametrize("channels,classes,size", [(3, 7, 96), (1, 10, 64), (3, 4, 32)])
def test_output_shape_follows_the_data(cls: type, channels: int, classes: int, size: int) -> None:
    model = cls(in_channels=channels, num_classes=classes, image_size=size).eval()
    x = torch.rand(2, channels, size, size).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, classes)


@pytest.mark.parametrize("model", ["tutorial_cnn", "bn_cnn", "resnet"])
def test_each_model_trains_a_few_steps(make_cfg: Callable[..., DictConfig], model: str) -> None:
    cfg = make_cfg(f"model={model}", "logger=none", "test=false")
    datamodule, module, trainer = build(cfg)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 20
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    assert module.net(torch.rand(3, 3, 32, 32)).shape == (3, 7)


@pytest.mark.parametrize("cls,kwargs", [
    (BNCNN, {"depth": 0}), (BNCNN, {"dropout": 1.0}), (BNCNN, {"channels": []}),
    (BNCNN, {"stem_stride": 3}), (ResNet, {"blocks": [1, 1]}), (ResNet, {"image_size": 8}),
    (ResNet, {"width": 0})])
def test_bad_model_options_are_reported(cls: type, kwargs: dict) -> None:
    with pytest.raises(GalaxyError, match="model"):
        cls(**kwargs)


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


@pytest.mark.parametrize("augment", ["data.augment=dihedral", "data.rotate=true",
                                     "data.max_shift=2"])
def test_augmentation_keeps_labels(make_cfg: Callable[..., DictConfig], augment: str) -> None:
    cfg = make_cfg(augment)
    datamodule, module, trainer = build(cfg)
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


def test_bad_augmentation_options_are_reported(make_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(GalaxyError, match="data.max_shift"):
        build(make_cfg("data.max_shift=20"))


# -- test-time augmentation ------------------------------------------------------------------
class InvariantNet(torch.nn.Module):
    """Invariant to every permutation of pixels (so to the 8 symmetries): mean pixel -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3)))


def test_tta_on_an_invariant_model_changes_nothing() -> None:
    module = GalaxyClassifier(TUTORIAL, ADAM, 7, [str(i) for i in range(7)], 3, 32).eval()
    x = torch.rand(5, 3, 32, 32)
    module.net = InvariantNet()
    assert torch.allclose(module.log_probs(x, tta=True), module.log_probs(x), atol=1e-5)
    torch.manual_seed(0)  # not invariant (a linear map of the pixel grid): TTA averages 8 views
    module.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 7))
    with torch.no_grad():
        expected = torch.stack([torch.softmax(module.net(dihedral(x, k, (2, 3))), 1)
                                for k in range(8)]).mean(0)
        got = module.log_probs(x, tta=True).exp()
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, module.log_probs(x).exp(), atol=1e-4)
    module.hparams.tta = True
    assert torch.allclose(module.predict_step(x, 0), expected, atol=1e-6)


# -- optimisation ----------------------------------------------------------------------------
def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_cosine(opt, total_steps=100, warmup_fraction=0.1, final_lr_fraction=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)  # 1/10 of the warm-up
    assert lrs[9] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then monotone decay
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # final_lr_fraction x lr at the end
    assert lrs[55] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


@pytest.mark.parametrize("scheduler", ["scheduler=cosine scheduler.warmup_fraction=0.25",
                                       "scheduler=onecycle"])
def test_schedulers_step_every_step(make_cfg: Callable[..., DictConfig], scheduler: str) -> None:
    cfg = make_cfg(*scheduler.split(), "optimizer.lr=0.01", "logger=none", "test=false")
    datamodule, module, trainer = build(cfg)
    seen: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer.callbacks.append(RecordLR())
    trainer.fit(module, datamodule=datamodule)
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.last_epoch == 20
    assert len(seen) == 20 and max(seen) == pytest.approx(0.01)  # the peak is optimizer.lr
    assert seen[0] <= 0.01 / 5 and seen[-1] < 0.01 / 50  # warm-up at the start, annealed at the end


@pytest.mark.parametrize("override,key", [
    ("trainer.max_steps=-1", "scheduler.total_steps"),
    ("scheduler.warmup_fraction=1.5", "scheduler.warmup_fraction"),
    ("+scheduler.warmup_steps=10", "scheduler.warmup_steps"),
])
def test_bad_scheduler_settings_are_reported(make_cfg: Callable[..., DictConfig], override: str,
                                             key: str) -> None:
    with pytest.raises(GalaxyError, match=key.replace(".", r"\.")):
        validate_config(make_cfg("scheduler=cosine", override))


def test_label_smoothing_is_the_smoothed_cross_entropy(make_cfg: Callable[..., DictConfig]) -> None:
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(32, 7, generator=gen), torch.randint(0, 7, (32,), generator=gen)
    log_p = F.log_softmax(logits, 1)
    target = torch.full((32, 7), 0.1 / 7).scatter_(1, labels[:, None], 0.9 + 0.1 / 7)
    expected = -(target * log_p).sum(1).mean()
    assert torch.allclose(GalaxyClassifier.risk(logits, labels, 0.1), expected, atol=1e-6)
    with pytest.raises(GalaxyError, match="label_smoothing"):
        validate_config(make_cfg("label_smoothing=1.0"))


# -- calibration -----------------------------------------------------------------------------
def test_reliability_bins_give_torchmetrics_ece() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 7, generator=gen) * 3, 1)
    labels = torch.randint(0, 7, (500,), generator=gen)
    bins = ReliabilityBins()
    bins.update(probs[:200], labels[:200])
    bins.update(probs[200:], labels[200:])
    b = {k: torch.tensor(v) for k, v in bins.compute().items()}
    assert b["count"].sum() == 500 and len(b["count"]) == CALIBRATION_BINS
    ece = ((b["correct"] - b["confidence"]).abs().sum() / 500).item()
    expected = multiclass_calibration_error(probs, labels, 7, n_bins=CALIBRATION_BINS, norm="l1")
    assert ece == pytest.approx(expected.item(), abs=1e-6)


def test_a_run_reports_calibration(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("tta=true")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    out = json.loads((run / "metrics.json").read_text())
    assert out["tta"] is True and out["test_ece"] == pytest.approx(metrics["test/ece"], abs=1e-6)
    assert sum(out["reliability"]["count"]) == 70  # every test image in one confidence bin
    assert sum(out["reliability"]["correct"]) == round(out["test_acc"] * 70)
    assert out["params"] == sum(p.numel() for p in TutorialCNN(image_size=32).parameters())
    assert out["fit_seconds"] > 0
    assert (run / "reliability_diagram.png").stat().st_size > 10_000


# -- the recommended experiment and the comparison table -------------------------------------
def test_recommended_experiment_composes_and_runs(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("experiment=recommended")
    assert cfg.model._target_.endswith("BNCNN") and cfg.tta is True
    assert cfg.data.augment == "dihedral" and cfg.scheduler.total_steps == 20
    assert cfg.trainer.precision == "bf16-mixed" and cfg.perf.compile is True
    metrics = train(cfg)
    assert metrics["val/acc_best"] > 0 and 0 <= metrics["test/acc"] <= 1
    assert 0 <= metrics["test/ece"] <= 1


def test_sweep_table_groups_seeds() -> None:
    def row(job: int, overrides: str, acc: float, ece: float) -> dict:
        return {"job": str(job), "overrides": overrides, "all_overrides": overrides,
                "status": "done", "test_acc": acc, "test_ece": ece, "params": 100,
                "fit_minutes": 2.0, "val_acc_best": acc}
    rows = [row(0, "experiment=a seed=0 paths.data_dir=/d", 0.70, 0.02),
            row(1, "experiment=a seed=1 paths.data_dir=/d", 0.74, 0.04),
            row(2, "experiment=b seed=0 paths.data_dir=/d", 0.90, 0.01),
            row(3, "experiment=b seed=1 paths.data_dir=/d", 0.92, 0.03)]
    groups = group_by_config(rows)
    assert [g["config"] for g in groups] == ["experiment=a", "experiment=b"]
    assert groups[0]["test_acc_mean"] == pytest.approx(0.72) and groups[0]["seeds"] == "0 1"
    assert (groups[1]["test_acc_min"], groups[1]["test_acc_max"]) == (0.90, 0.92)
    table = markdown_table(groups)
    assert "| experiment=a | 100 | 2.0 | 72.0% (70.0-74.0) | 0.030 (0.020-0.040) | 0 1 |" in table
