"""Building blocks shared by the batch-normalised models (BNCNN, ResNet)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from galaxy_lightning.errors import ConfigError


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: the BN shift replaces it) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def stem(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """The first layer: a 5x5 conv when it downsamples (a wider view for the strided step)."""
    return conv_bn_relu(c_in, c_out, 5 if stride > 1 else 3, stride)


def stage_channels(name: str, channels: Sequence[int], image_size: int, stem_stride: int,
                   width: float, dropout: float) -> list[int]:
    """Validated, width-scaled channel counts of a model with one 2x downsampling per stage."""
    if not channels or any(int(c) <= 0 for c in channels):
        raise ConfigError(f"channels={list(channels)} must be a non-empty list of positive ints")
    if not width > 0:
        raise ConfigError(f"width={width} must be positive")
    if stem_stride not in (1, 2, 4):
        raise ConfigError(f"stem_stride={stem_stride} must be 1, 2 or 4")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout={dropout} must be in [0, 1)")
    side = image_size // stem_stride // 2 ** (len(channels) - 1)
    if side < 1:
        raise ConfigError(f"{name}: {len(channels)} stages after a stride-{stem_stride} stem are too "
                          f"many for {image_size} px images; shorten model.channels")
    return [max(1, round(int(c) * width)) for c in channels]


class PooledClassifier(nn.Module):
    """``features`` (set by the subclass), then global average pooling, dropout and a linear
    layer. Pooling makes the head independent of the image size and of where the galaxy sits."""

    features: nn.Sequential
    head: nn.Sequential

    def set_layers(self, features: list[nn.Module], c_out: int, num_classes: int,
                   dropout: float) -> None:
        self.features = nn.Sequential(*features)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_out, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
