"""The tutorial CNN and the risk."""

from __future__ import annotations

import pytest
import torch

from galaxy_lightning.errors import GalaxyError
from galaxy_lightning.models import TutorialCNN
from galaxy_lightning.module import GalaxyClassifier

MODEL = {"_target_": "galaxy_lightning.models.TutorialCNN", "channels": [4, 5, 6, 7], "pool": "avg"}
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}


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


def test_notebook_variant_and_shapes_follow_the_data() -> None:
    assert n_params(TutorialCNN(channels=[4, 6, 9, 13], pool="max")) == 5178
    model = TutorialCNN(in_channels=1, num_classes=10, image_size=64)
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 10)
    assert model(torch.rand(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)).shape == (2, 10)


@pytest.mark.parametrize("kwargs", [{"pool": "median"}, {"channels": []}, {"image_size": 8}])
def test_bad_model_options_are_reported(kwargs: dict) -> None:
    with pytest.raises(GalaxyError, match="model"):
        TutorialCNN(**kwargs)


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
    module = GalaxyClassifier(MODEL, ADAM, 7, [str(i) for i in range(7)], 3, 96)
    images = torch.rand(4, 3, 96, 96)
    probs = module.predict_step((images, torch.zeros(4, dtype=torch.long)), 0)
    assert probs.shape == (4, 7)
    assert torch.all(probs >= 0) and torch.allclose(probs.sum(1), torch.ones(4))
    assert torch.allclose(probs, torch.softmax(module(images), 1))
