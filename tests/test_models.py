"""Models: the tutorial CNN, the BN-CNN and the ResNet; the risk and what the module predicts."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from galaxy_lightning.config import validate_config
from galaxy_lightning.errors import ConfigError
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.models import BNCNN, ResNet, TutorialCNN
from galaxy_lightning.module import GalaxyClassifier
from galaxy_lightning.train import build_and_prepare

MODEL = {"_target_": "galaxy_lightning.models.TutorialCNN", "channels": [4, 5, 6, 7], "pool": "avg"}
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}


def spec(size: int = 96, channels: int = 3, classes: int = 7) -> dict:
    return InputSpec(class_names=tuple(str(i) for i in range(classes)), channels=channels,
                     image_size=size).to_dict()


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_tutorial_cnn_is_the_course_model() -> None:
    model = TutorialCNN()
    assert n_params(model) == 2729
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 4, (3, 3), (1, 1)), (4, 5, (3, 3), (1, 1)), (5, 6, (3, 3), (1, 1)), (6, 7, (3, 3), (1, 1))]
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model.features) == 4
    assert model.classifier.in_features == 252 and model.classifier.out_features == 7
    assert model(torch.rand(5, 3, 96, 96)).shape == (5, 7)


def test_the_notebook_variant_has_its_parameter_count() -> None:
    assert n_params(TutorialCNN(channels=[4, 6, 9, 13], pool="max")) == 5178


@pytest.mark.parametrize("cls", [TutorialCNN, BNCNN, ResNet])
@pytest.mark.parametrize("channels,classes,size", [(3, 7, 96), (1, 10, 64), (3, 4, 32)])
def test_output_shape_follows_the_data(cls: type, channels: int, classes: int, size: int) -> None:
    model = cls(in_channels=channels, num_classes=classes, image_size=size).eval()
    x = torch.rand(2, channels, size, size)
    assert model(x).shape == (2, classes)
    assert model(x.contiguous(memory_format=torch.channels_last)).shape == (2, classes)


@pytest.mark.parametrize("model", ["tutorial_cnn", "bn_cnn", "resnet"])
def test_each_model_trains_a_few_steps(make_cfg: Callable[..., DictConfig], model: str) -> None:
    cfg = make_cfg(f"model={model}", "logger=none", "test=false")
    datamodule, module, trainer = build_and_prepare(cfg)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 20
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    assert module.net(torch.rand(3, 3, 32, 32)).shape == (3, 7)


@pytest.mark.parametrize("cls,kwargs,message", [
    (TutorialCNN, {"pool": "median"}, "pool='median'"), (TutorialCNN, {"channels": []}, "channels="),
    (TutorialCNN, {"image_size": 8}, "pooling blocks"),
    (BNCNN, {"depth": 0}, "depth=0"), (BNCNN, {"dropout": 1.0}, "dropout=1.0"),
    (BNCNN, {"channels": []}, "channels=[]"), (BNCNN, {"stem_stride": 3}, "stem_stride=3"),
    (ResNet, {"blocks": [1, 1]}, "blocks=[1, 1]"), (ResNet, {"image_size": 8}, "too many for 8 px"),
    (ResNet, {"width": 0}, "width=0")])
def test_bad_model_options_are_reported(cls: type, kwargs: dict, message: str,
                                        make_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        cls(**kwargs)  # worded for any caller: the parameter, not a config key
    assert "\n" not in str(err.value)
    name = {TutorialCNN: "tutorial_cnn", BNCNN: "bn_cnn", ResNet: "resnet"}[cls]
    overrides = [f"model.{k}={v}".replace(" ", "") for k, v in kwargs.items() if k != "image_size"]
    if overrides:  # from a config, the config key is named in front
        with pytest.raises(ConfigError, match=r"^model: " + message.replace("[", r"\[")):
            build_and_prepare(make_cfg(f"model={name}", *overrides))


def test_risk_is_mean_negative_log_softmax_at_the_label() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=gen) * 5
    labels = torch.randint(0, 7, (64,), generator=gen)
    expected = -torch.log(torch.softmax(logits.double(), 1))[torch.arange(64), labels].mean()
    assert torch.allclose(GalaxyClassifier.risk(logits, labels).double(), expected, atol=1e-5)
    # Stable where a naive softmax -> log overflows: logits of 1e4 give a finite risk.
    huge = torch.tensor([[1e4, 0.0, -1e4]])
    assert torch.isfinite(GalaxyClassifier.risk(huge, torch.tensor([2])))
    assert GalaxyClassifier.risk(huge, torch.tensor([2])).item() == pytest.approx(2e4)


def test_predict_step_returns_probabilities() -> None:
    module = GalaxyClassifier(MODEL, spec(), ADAM)
    images = torch.rand(4, 3, 96, 96)
    probs = module.predict_step((images, torch.zeros(4, dtype=torch.long)), 0)
    assert probs.shape == (4, 7)
    assert torch.all(probs >= 0) and torch.allclose(probs.sum(1), torch.ones(4))
    assert torch.allclose(probs, torch.softmax(module(images), 1))


def test_the_model_is_sized_from_the_input_spec() -> None:
    module = GalaxyClassifier(MODEL, spec(size=64, channels=1, classes=4), ADAM)
    assert module.net.features[0].in_channels == 1 and module.net.classifier.out_features == 4
    assert module.class_names == ["0", "1", "2", "3"]
    assert set(module.hparams) == {"model", "input_spec", "optimizer", "scheduler", "task",
                                   "label_smoothing", "data"}  # no inference options, no compile


def test_label_smoothing_is_the_smoothed_cross_entropy(make_cfg: Callable[..., DictConfig]) -> None:
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(32, 7, generator=gen), torch.randint(0, 7, (32,), generator=gen)
    log_p = F.log_softmax(logits, 1)
    target = torch.full((32, 7), 0.1 / 7).scatter_(1, labels[:, None], 0.9 + 0.1 / 7)
    expected = -(target * log_p).sum(1).mean()
    assert torch.allclose(GalaxyClassifier.risk(logits, labels, 0.1), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing"):
        validate_config(make_cfg("label_smoothing=1.0"))
