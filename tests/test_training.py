"""Training end to end: learning, outputs, reproducibility, resume, schedules, test-time
augmentation, calibration, the recipes, performance modes, the quickstart and DDP."""

from __future__ import annotations

import json
from datetime import datetime, timezone
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import multiclass_calibration_error

from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.config import validate_config
from galaxy_lightning.data.augment import dihedral
from galaxy_lightning.errors import ConfigError
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.models import TutorialCNN
from galaxy_lightning.module import CALIBRATION_BINS, GalaxyClassifier, ReliabilityBins, metric_slug
from galaxy_lightning import perf
from galaxy_lightning.perf import tune_malloc
from galaxy_lightning.schedules import warmup_cosine
from galaxy_lightning.train import build_and_prepare, train

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}
TUTORIAL = {"_target_": "galaxy_lightning.models.TutorialCNN"}


LEARNS = [  # small enough for the fast suite, long enough for the tutorial CNN to learn
    "data.source.n_per_class=200", "data.source.image_size=48", "data.splits=[1000,200,200]",
    "data.batch_size=100", "data.eval_batch_size=200", "optimizer.lr=0.003",
    "trainer.max_steps=300", "trainer.val_check_interval=100", "trainer.log_every_n_steps=10",
]


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_short_run_learns_and_its_outputs_agree(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(*LEARNS, "callbacks.run_artifacts.figures=true")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    chance = 1 / 7
    assert metrics["test/acc"] > 0.35 > 2 * chance
    assert metrics["val/acc_best"] > 0.35

    for name in ("accuracy_curve.png", "confusion_matrix.png", "examples.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file()
    import torch

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 300  # the latest validation, not the best one
    best = json.loads((run / "metrics.json").read_text())
    cm = np.array(best["test/confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == 200
    assert best["test/acc"] == pytest.approx(np.trace(cm) / cm.sum())
    assert best["test/acc"] == pytest.approx(metrics["test/acc"])
    per_class = np.diag(cm) / cm.sum(1)
    slugs = [metric_slug(n) for n in best["class_names"]]
    assert [best[f"test/acc_class/{s}"] for s in slugs] == pytest.approx(per_class.tolist())
    assert best["history"]["val_step"] == [100, 200, 300]
    assert best["val/acc_best"] == pytest.approx(max(best["history"]["val_acc"]))
    assert best["val/acc_best"] == pytest.approx(metrics["val/acc_best"])
    # one name per number: every scalar of the test in metrics.json is the logger's own
    assert {k for k in best if k.startswith("test/")} >= {k for k in metrics if k.startswith("test/")}
    assert Path(best["checkpoint"]).is_file()
    assert f"step{best['best_step']:05d}" in Path(best["checkpoint"]).name

    tb = events(run)
    tags = tb.Tags()
    for tag in ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/acc_best",
                "test/acc", "val/acc_class/merging", "test/acc_class/edge_on_with_bulge"):
        assert tag in tags["scalars"], tag
    for tag in ("test/confusion_matrix", "test/reliability_diagram", "data/examples",
                "curves/accuracy", "val/confusion_matrix_at_best"):
        assert tag in tags["images"], tag
    # Lightning logs at the index of the last batch (global_step - 1); metrics.json counts steps.
    assert [e.step for e in tb.Scalars("val/acc")] == [99, 199, 299]
    assert [e.value for e in tb.Scalars("val/acc")] == pytest.approx(best["history"]["val_acc"])
    assert [e.value for e in tb.Scalars("train/acc")] == pytest.approx(best["history"]["train_acc"])
    assert tb.Scalars("test/acc")[-1].value == pytest.approx(best["test/acc"])
    assert [e.value for e in tb.Scalars("train/lr")][:3] == pytest.approx([0.003] * 3)
    assert len(tb.Scalars("train/loss")) == 30  # every log_every_n_steps=10


def test_same_seed_gives_identical_metrics(make_cfg: Callable[..., DictConfig],
                                          tiny_run: tuple) -> None:
    results = []
    # the session's tiny run (figures drawn), and the same run again without figures: the
    # figures change no number, and figures=false draws none but keeps the report's data
    assert (tiny_run[0].parents[1] / "confusion_matrix.png").is_file()
    for metrics in (dict(tiny_run[1]), None):
        if metrics is None:
            cfg = make_cfg(run="again")
            assert cfg.callbacks.run_artifacts.figures is False
            train(cfg)
            run = Path(cfg.paths.output_dir)
            assert not list(run.glob("*.png")) and (run / "mistakes.json").is_file()
            metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("checkpoint")
        assert metrics.pop("fit_seconds") > 0  # wall time and clock time: all that may differ
        assert metrics.pop("finished") <= datetime.now(timezone.utc).isoformat()
        results.append(metrics)
    assert results[0] == results[1]
    assert results[0]["history"]["val_step"] == [10, 20]


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == 15:
            raise RuntimeError("simulated kill")


def test_resume_continues_a_killed_run_to_the_same_end(make_cfg: Callable[..., DictConfig],
                                                       tiny_run: tuple) -> None:
    reference = tiny_run[1]  # the uninterrupted run: the session's tiny run (same config)

    killed = make_cfg(run="killed")
    L.seed_everything(killed.seed, workers=True, verbose=False)  # as train() does before build()
    datamodule, module, trainer = build_and_prepare(killed)
    trainer.callbacks.append(_Crash())
    with pytest.raises(RuntimeError, match="simulated kill"):
        trainer.fit(module, datamodule=datamodule)
    last = Path(killed.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()

    resumed = make_cfg(f"ckpt_path={last}", run="resumed")
    metrics = train(resumed)
    result = json.loads((Path(resumed.paths.output_dir) / "metrics.json").read_text())
    assert result["global_step"] == reference["global_step"] == 20
    # The curve continues the killed run's history: the validation before the kill (step 10, in
    # last.ckpt) is kept exactly, and the resumed run adds the one at step 20.
    assert result["history"]["val_step"] == reference["history"]["val_step"] == [10, 20]
    assert result["history"]["val_acc"][0] == reference["history"]["val_acc"][0]
    assert result["history"]["train_acc"][0] == reference["history"]["train_acc"][0]
    assert metrics["val/acc_best"] == pytest.approx(max(result["history"]["val_acc"]))
    # and it ends where the uninterrupted run ended (exact resume)
    for key in ("test/acc", "test/confusion_matrix", "val/acc_best", "best_step"):
        assert result[key] == reference[key], key


# -- schedules, test-time augmentation, calibration, recipes ----------------------------------
class InvariantNet(torch.nn.Module):
    """Invariant to every permutation of pixels (so to the 8 symmetries): mean pixel -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3)))


def test_tta_on_an_invariant_model_changes_nothing() -> None:
    spec = InputSpec(class_names=tuple(str(i) for i in range(7)), channels=3, image_size=32)
    module = GalaxyClassifier(TUTORIAL, spec.to_dict(), ADAM).eval()
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
    module.set_inference(tta=True)
    assert torch.allclose(module.predict_step(x, 0), expected, atol=1e-6)
    assert "tta" not in module.hparams  # an inference option, not a training hyperparameter


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
    datamodule, module, trainer = build_and_prepare(cfg)
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
    ("trainer.max_steps=-1", "scheduler: total_steps=-1"),
    ("scheduler.warmup_fraction=1.5", "scheduler: warmup_fraction=1.5"),
    ("+scheduler.warmup_steps=10", "scheduler.warmup_steps"),
])
def test_bad_scheduler_settings_are_reported(make_cfg: Callable[..., DictConfig], override: str,
                                             key: str) -> None:
    """Unknown keys before any data; values by the schedule itself, when it is built at the
    start of training (before the first step)."""
    # (an epoch limit: a run bounded by epochs alone is a valid run, but its schedule has no length)
    cfg = make_cfg("scheduler=cosine", "trainer.max_epochs=2", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate_config(cfg)
        _, module, _ = build_and_prepare(cfg)
        module.configure_optimizers()
    assert "\n" not in str(err.value)


def test_reliability_bins_give_torchmetrics_ece() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 7, generator=gen) * 3, 1)
    labels = torch.randint(0, 7, (500,), generator=gen)
    bins = ReliabilityBins()
    bins.update(probs[:200], labels[:200])
    bins.update(probs[200:], labels[200:])
    b = dict(zip(("count", "confidence", "correct"), bins.compute()))
    assert b["count"].sum() == 500 and len(b["count"]) == CALIBRATION_BINS
    ece = ((b["correct"] - b["confidence"]).abs().sum() / 500).item()
    expected = multiclass_calibration_error(probs, labels, 7, n_bins=CALIBRATION_BINS, norm="l1")
    assert ece == pytest.approx(expected.item(), abs=1e-6)


def test_a_run_reports_calibration(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("tta=true", "callbacks.run_artifacts.figures=true")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    out = json.loads((run / "metrics.json").read_text())
    assert out["tta"] is True and out["test/ece"] == pytest.approx(metrics["test/ece"], abs=1e-6)
    assert sum(out["test/reliability"]["count"]) == 70  # every test image in one confidence bin
    assert sum(out["test/reliability"]["correct"]) == round(out["test/acc"] * 70)
    assert out["params"] == sum(p.numel() for p in TutorialCNN(image_size=32).parameters())
    assert out["fit_seconds"] > 0
    assert (run / "reliability_diagram.png").stat().st_size > 10_000


# -- the recommended experiment and the comparison table -------------------------------------
@pytest.mark.slow
def test_recommended_experiment_composes_and_runs(make_cfg: Callable[..., DictConfig]) -> None:
    as_shipped = make_cfg("experiment=recommended", tiny=False, run="as_shipped")
    assert as_shipped.trainer.max_steps == -1 and as_shipped.length.min_steps > 0  # follows the data
    cfg = make_cfg("experiment=recommended")  # (composed last: the run uses its Hydra config)
    assert cfg.model._target_.endswith("BNCNN") and cfg.tta is True
    assert list(cfg.data.augment) == ["dihedral", "rotate", "shift"]
    assert cfg.scheduler.total_steps == 20  # a step count given wins over the recipe's length
    assert cfg.trainer.precision == perf.fast_precision("auto") and cfg.perf.compile is True
    metrics = train(cfg)
    assert metrics["val/acc_best"] > 0 and 0 <= metrics["test/acc"] <= 1
    assert 0 <= metrics["test/ece"] <= 1


def test_augmented_training_runs_end_to_end(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("data.augment=[dihedral,rotate,shift]")
    assert 0 <= train(cfg)["test/acc"] <= 1


# -- performance modes -----------------------------------------------------------------------------
def test_tune_malloc_takes_effect_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting is glibc-specific")
    assert tune_malloc() is True


@pytest.mark.slow
def test_step_timer_and_fast_mode_keep_checkpoints_compatible(
        make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    timing = tmp_path / "timing.json"
    cfg = make_cfg("perf=fast", "+callbacks.step_timer._target_=galaxy_lightning.callbacks.StepTimer",
                   f"+callbacks.step_timer.output_file={timing}", "+callbacks.step_timer.warmup_steps=5")
    metrics = train(cfg)
    summary = json.loads(timing.read_text())
    assert summary["steps"] == 20 and summary["compiled"] is True
    assert summary["precision"] == perf.fast_precision("auto")
    assert summary["ms_per_step"] > 0 and summary["peak_rss_mb"] > 100
    assert 0 <= metrics["test/acc"] <= 1
    # A fast-mode checkpoint loads into a plain float32 module: same keys, no compiled wrapper.
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    module = load_classifier(ckpt)
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.slow
@pytest.mark.skipif(not perf.cpu_has_native_bf16() and not torch.cuda.is_available(),
                    reason="bfloat16 is emulated on this CPU (10x slower): the parity of its "
                           "numerics is checked where the hardware computes in it")
def test_fast_mode_does_not_cost_accuracy(make_cfg: Callable[..., DictConfig]) -> None:
    """Same seeds, 600 steps at the tutorial's learning rate: test accuracy of the final weights
    in fast mode (bf16 autocast + compile) against float32, on 1,000 test images, seeds 0-2.
    bfloat16 is asked for explicitly: perf=fast would choose float32 on a CPU that only emulates
    it, and the claim is about bfloat16's numerics.

    One seed's difference is noise of about 2.2 points (the standard error of a difference of two
    accuracies near 50% on 1,000 images), so a single seed within 1 point is not a sound test (it
    failed at seed 2 on unchanged code: 49.0% vs 52.5%, fast ahead). The claim is tested where it
    is sound: on the mean over the seeds, fast mode loses at most 1 point, and no seed differs by
    more than 2 standard errors."""
    accs: dict[str, list[float]] = {"default": [], "fast": []}
    for seed in (0, 1, 2):
        for mode in ("default", "fast"):
            cfg = make_cfg(f"perf={mode}", "data.source.n_per_class=600", "data.source.image_size=48",
                           "data.splits=[2800,400,1000]", "data.batch_size=100",
                           "data.eval_batch_size=500", "trainer.max_steps=600",
                           "trainer.val_check_interval=100", "logger=none", f"seed={seed}",
                           *(["trainer.precision=bf16-mixed"] if mode == "fast" else []),
                           run=f"{mode}{seed}")
            L.seed_everything(seed, verbose=False)
            datamodule, module, trainer = build_and_prepare(cfg)
            trainer.fit(module, datamodule=datamodule)
            accs[mode].append(trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"])
    assert min(accs["default"]) > 0.4 and min(accs["fast"]) > 0.4, accs  # all learned
    assert np.mean(accs["fast"]) >= np.mean(accs["default"]) - 0.01, accs
    assert max(abs(f - d) for f, d in zip(accs["fast"], accs["default"])) < 0.045, accs


def test_fast_precision_is_bfloat16_only_where_the_hardware_computes_in_it(
        monkeypatch: pytest.MonkeyPatch, make_cfg: Callable[..., DictConfig]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda native=native: native)
        assert perf.fast_precision("cpu") == perf.fast_precision("auto") == expected
        assert make_cfg("perf=fast").trainer.precision == expected  # what the run config records
        warning = perf.slow_precision_warning("bf16-mixed", "auto")
        assert (warning is None) == native
    assert "trainer.precision=32-true" in warning
    assert perf.slow_precision_warning("32-true", "cpu") is None
    assert perf.fast_precision("mps") == "32-true"  # Lightning has no bf16 autocast there
    assert make_cfg("perf=fast", "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(perf, "_cuda_has_native_bf16", lambda native=native: native)
        assert perf.fast_precision("gpu") == perf.fast_precision("auto") == expected
    assert perf.slow_precision_warning("bf16-mixed", "auto") is None  # not the CPU's business


# -- the README's quickstart, DDP -------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_trains_well_above_chance_and_writes_every_output(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=quickstart",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 400
    assert metrics["test/acc"] > 0.45  # chance is 1/7
    assert sum(map(sum, metrics["test/confusion_matrix"])) == 1000
    for name in ("accuracy_curve.png", "confusion_matrix.png", "examples.png", "config.yaml",
                 "quickstart.log", "checkpoints/last.ckpt", "mistakes.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    report = (run / "report.html").read_text()  # the one page to open or send
    assert "experiment=quickstart" in report and f"{100 * metrics['test/acc']:.1f}%" in report


@pytest.mark.slow
def test_ddp_simulated_with_two_cpu_processes(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, "trainer=ddp_sim",
         f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 20
    cm = np.array(metrics["test/confusion_matrix"])
    assert cm.sum() == 70  # every test image counted once across the two processes
    assert metrics["test/acc"] == pytest.approx(np.trace(cm) / 70)
    assert set(metrics) >= {"test/acc", "test/acc_class/merging", "val/acc_best", "history"}


# -- small real data sets: BatchNorm statistics, weight averaging, calibration, folds -----------
def test_batchnorm_statistics_match_the_weights_they_are_computed_for(
        make_cfg: Callable[..., DictConfig]) -> None:
    from galaxy_lightning.callbacks import BatchNormStatistics

    cfg = make_cfg("model=bn_cnn", "logger=none", "test=false")
    datamodule, module, trainer = build_and_prepare(cfg)
    trainer.fit(module, datamodule=datamodule)
    callback = BatchNormStatistics(images=100, batch_size=32)
    trainer.callbacks.append(callback)
    callback.on_validation_epoch_start(trainer, module)
    bns = [m for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # the running statistics are now the plain mean over those 100 images' batches ...
    train = datamodule.split("train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:100]
    x = datamodule.preprocess(train.images[order])
    seen: list[torch.Tensor] = []
    hook = bns[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    module.eval()
    with torch.no_grad():
        module.net(x)
    hook.remove()
    batch_means = [x_.mean((0, 2, 3)) for x_ in seen[0].split(32)]
    expected = torch.stack(batch_means).mean(0)
    assert torch.allclose(bns[0].running_mean, expected, atol=1e-5)
    # ... and the same whenever they are recomputed (deterministic)
    before = [b.running_var.clone() for b in bns]
    callback.on_validation_epoch_start(trainer, module)
    assert all(torch.equal(a, b.running_var) for a, b in zip(before, bns))
    assert module.training is False  # the mode it was in is restored


def test_weight_averaging_is_what_is_validated_checkpointed_and_tested(
        make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("model=bn_cnn", "callbacks=[default,ema]", "callbacks.ema.decay=0.5",
                   "callbacks.ema.update_starting_at_step=0", "callbacks.bn_statistics.images=64",
                   "logger=none")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    best = json.loads((run / "metrics.json").read_text())
    checkpoint = torch.load(best["checkpoint"], weights_only=True)
    averaged, online = checkpoint["state_dict"], checkpoint["current_model_state"]
    name = "net.head.3.weight"
    assert not torch.equal(averaged[name], online[name])  # two sets of weights were kept
    # the test evaluated the averaged weights: re-evaluating them reproduces the test accuracy
    from galaxy_lightning.evaluate import evaluate

    results = evaluate(best["checkpoint"], run / "eval")
    assert results["test/acc"] == pytest.approx(metrics["test/acc"])
    module = load_classifier(best["checkpoint"])
    assert torch.equal(module.state_dict()[name], averaged[name])


@pytest.mark.slow
def test_recomputing_batchnorm_statistics_changes_no_training_step(
        make_cfg: Callable[..., DictConfig]) -> None:
    """Only what validation sees changes: the trained weights are those of a run without it (so
    the two runs are a controlled comparison of evaluating with running or recomputed statistics)."""
    common = ("model=bn_cnn", "logger=none", "data.augment=[dihedral]")
    plain, recomputed = make_cfg(*common, run="plain"), make_cfg(
        *common, "callbacks=[default,bn_statistics]", "callbacks.bn_statistics.images=64", run="bn")
    train(plain)
    train(recomputed)
    weights = [torch.load(Path(c.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
               ["state_dict"] for c in (plain, recomputed)]
    trained = [k for k in weights[0] if k.startswith("net.") and "running_" not in k
               and "num_batches" not in k]
    assert any(k.endswith("weight") for k in trained)
    for key in trained:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if "running_mean" in k)


@pytest.mark.slow
def test_weight_averaging_before_it_starts_is_the_current_weights(
        make_cfg: Callable[..., DictConfig]) -> None:
    """Lightning's callback would validate (and checkpoint, and end with) the initial weights
    until averaging starts; here a run whose averaging never starts is the run without it."""
    common = ("model=bn_cnn", "callbacks.bn_statistics.images=64", "logger=none")
    plain = train(make_cfg(*common, "callbacks=[default,bn_statistics]", run="plain"))
    never = make_cfg(*common, "callbacks=[default,ema]", "callbacks.ema.update_starting_at_step=1000",
                     run="never")
    averaged = train(never)
    for key in ("val/acc_best", "test/acc", "test/loss"):
        assert averaged[key] == plain[key], key
    history = json.loads((Path(never.paths.output_dir) / "metrics.json").read_text())["history"]
    assert min(history["val_acc"]) > 0.2  # trained weights at every check, not the initial ones


def test_calibrating_a_given_checkpoint_leaves_it_untouched(make_cfg: Callable[..., DictConfig]) -> None:
    import hashlib

    first = make_cfg("logger=none", run="first")
    train(first)
    best = json.loads((Path(first.paths.output_dir) / "metrics.json").read_text())["checkpoint"]
    before = hashlib.sha256(Path(best).read_bytes()).hexdigest()
    again = make_cfg("train=false", f"ckpt_path={best}", "calibrate=true", "logger=none", run="again")
    metrics = train(again)
    assert hashlib.sha256(Path(best).read_bytes()).hexdigest() == before  # the user's file
    calibrated = Path(again.paths.output_dir) / "checkpoints" / "calibrated.ckpt"
    assert load_classifier(calibrated).temperature.item() == pytest.approx(metrics["test/temperature"])
    assert json.loads((Path(again.paths.output_dir) / "metrics.json").read_text())["checkpoint"] == \
        str(calibrated)


class _OverConfident(torch.nn.Module):
    """Logits of a fixed linear model, multiplied by 8: right ~70% of the time, sure every time."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8 * self.linear(x)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model_on_held_out_data() -> None:
    from galaxy_lightning.calibration import fit_temperature

    gen = torch.Generator().manual_seed(0)
    model = _OverConfident()
    torch.nn.init.normal_(model.linear.weight, generator=gen)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 2, generator=gen)
        p = torch.softmax(model.linear(x).detach(), 1)  # labels drawn from the unscaled model
        return x, torch.multinomial(p, 1, generator=gen).flatten()

    (x_val, y_val), (x_test, y_test) = data(2000), data(2000)
    with torch.no_grad():
        t = fit_temperature(model(x_val)[None], y_val)
        logits = model(x_test)
    assert 6 < t < 10  # it undoes the factor of 8
    before = F.cross_entropy(logits, y_test).item()
    after = F.cross_entropy(logits / t, y_test).item()
    assert after < 0.8 * before
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))  # no prediction changes
    ece = [multiclass_calibration_error(torch.softmax(z, 1), y_test, 3, n_bins=15).item()
           for z in (logits, logits / t)]
    assert ece[1] < ece[0] / 2


def test_a_calibrated_run_stores_its_temperature_and_evaluation_uses_it(
        make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    cfg = make_cfg("calibrate=true", "tta=true")
    metrics = train(cfg)
    out = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    t = out["test/temperature"]
    assert out["calibrated"] is True and t != 1.0 and "test/ece_uncalibrated" in out
    module = load_classifier(out["checkpoint"])
    assert module.calibrated and module.tta and module.temperature.item() == pytest.approx(t)
    from galaxy_lightning.evaluate import evaluate

    again = evaluate(out["checkpoint"], tmp_path / "eval")
    assert again["test/ece"] == pytest.approx(metrics["test/ece"], abs=1e-6)
    assert again["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_soft_targets_train_against_the_fractions(tmp_path: Path) -> None:
    from galaxy_lightning.data.datamodule import GalaxyDataModule
    from galaxy_lightning.data.prepared import read_prepared
    from galaxy_lightning.data.synthetic import SyntheticGalaxies
    from galaxy_lightning.evaluate import PreparedFile

    from .helpers import write_prepared

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=gen)
    targets = torch.softmax(torch.randn(6, 3, generator=gen), 1)
    expected = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(GalaxyClassifier.risk(logits, targets), expected, atol=1e-6)
    # a prepared file with vote-like fractions, trained with soft_targets=true
    plain = SyntheticGalaxies(n_per_class=20, image_size=32).prepare(tmp_path, progress=False)
    source = read_prepared(plain)
    fractions = np.full((len(source.labels), 7), 0.1 / 6, np.float32)
    fractions[np.arange(len(source.labels)), source.labels] = 0.9
    path = write_prepared(tmp_path / "soft.h5", source.images, source.labels, source.info.spec,
                          {"source": "soft"}, targets=fractions)
    datamodule = GalaxyDataModule(PreparedFile(str(path)), batch_size=40, eval_batch_size=20,
                                  splits=[100, 20, 20], soft_targets=True)
    datamodule.prepare_data()
    images, labels, extras = next(iter(datamodule.train_dataloader()))
    soft = extras["targets"]
    assert soft.shape == (40, 7) and torch.allclose(soft.sum(1), torch.ones(40))
    assert torch.equal(soft.argmax(1), labels)
    assert len(next(iter(datamodule.val_dataloader()))) == 2  # evaluation: against the labels
    module = GalaxyClassifier({"_target_": "galaxy_lightning.models.TutorialCNN"},
                              source.info.spec.to_dict(), {"_target_": "torch.optim.Adam", "lr": 1e-2})
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 5 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    with pytest.raises(ConfigError, match="soft_targets=true but .* has no soft targets"):
        GalaxyDataModule(PreparedFile(str(plain)), splits=[100, 20, 20], soft_targets=True).prepare_data()


def test_cross_validation_folds_are_disjoint_stratified_and_cover_the_pool() -> None:
    from galaxy_lightning.data.datamodule import split_indices

    labels = np.repeat(np.arange(4), [60, 30, 15, 15])
    folds = [split_indices(labels, None, [90, 15, 15], 0, Path("f.h5"), folds=5, fold=i)
             for i in range(5)]
    test = folds[0]["test"]
    assert all(torch.equal(f["test"], test) for f in folds)  # the test split stays fixed
    pool = set(torch.cat([folds[0]["train"], folds[0]["val"]]).tolist())
    vals = [set(f["val"].tolist()) for f in folds]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool) == 105  # disjoint, cover
    assert not pool & set(test.tolist())
    for f, v in zip(folds, vals):
        assert set(f["train"].tolist()) == pool - v
        counts = np.bincount(labels[sorted(v)], minlength=4)
        pool_counts = np.bincount(labels[sorted(pool)], minlength=4)
        assert (np.abs(counts - pool_counts / 5) <= 1).all()  # each class in proportion
    with pytest.raises(ConfigError, match="fewer than the folds"):
        split_indices(labels, None, [90, 15, 15], 0, Path("f.h5"), folds=20, fold=0)
