"""The tutorial's CNN: 4 x [Conv2d 3x3 pad 1 -> pool 2 -> ReLU], then one linear layer to the logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from galaxy_lightning.errors import ConfigError

_POOLS: dict[str, type[nn.Module]] = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class TutorialCNN(nn.Module):
    """The course model (channels 3-4-5-6-7, AvgPool, Linear 252 -> 7: 2,729 parameters at 96 px).

    ``channels`` lists the output channels of the conv blocks (the input channels come from the
    data); ``pool`` is ``"avg"`` (the slides) or ``"max"`` (an earlier notebook, channels 4-6-9-13);
    ``width`` multiplies every channel count (one number for hyperparameter searches).
    The network returns logits: the softmax lives in the risk and in ``predict_step``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 7, image_size: int = 96,
                 channels: Sequence[int] = (4, 5, 6, 7), pool: str = "avg",
                 width: float = 1.0) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ConfigError(f"pool={pool!r} is not one of {sorted(_POOLS)}")
        if not channels or any(int(c) <= 0 for c in channels):
            raise ConfigError(f"channels={list(channels)} must be a non-empty list of positive ints")
        if not width > 0:
            raise ConfigError(f"width={width} must be positive")
        channels = [max(1, round(int(c) * width)) for c in channels]
        side = image_size // 2 ** len(channels)
        if side < 1:
            raise ConfigError(f"channels has {len(channels)} pooling blocks, too many for "
                              f"{image_size} px images; use at most {image_size.bit_length() - 1}")
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks += [nn.Conv2d(previous, int(width), 3, padding=1), _POOLS[pool](2), nn.ReLU()]
            previous = int(width)
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(previous * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
