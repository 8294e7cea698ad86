"""A small residual network (He et al. 2016), sized for 2 CPU cores.

Why: identity shortcuts keep gradients healthy in a deeper network, so it can be deeper than the
BN-CNN at the same cost; downsampling is a stride-2 conv inside the first block of each stage,
with a 1x1 projection on the shortcut where the shape changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from galaxy_lightning.errors import ConfigError
from galaxy_lightning.models.layers import PooledClassifier, conv_bn_relu, stage_channels, stem


class BasicBlock(nn.Module):
    """relu(x' + BN(conv(relu(BN(conv(x)))))) with x' = x or its 1x1-projected, strided version."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, 3, stride)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity: easier early training
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.bn2(self.conv2(self.conv1(x))))


class ResNet(PooledClassifier):
    """Stem conv 5x5 (stride ``stem_stride``), stages of ``blocks[i]`` basic blocks with
    ``channels[i]`` channels (stride 2 from the second stage on), global average pool, dropout,
    linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 7, image_size: int = 96,
                 channels: Sequence[int] = (16, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1, 1),
                 stem_stride: int = 2, dropout: float = 0.2, width: float = 1.0) -> None:
        super().__init__()
        channels = stage_channels("ResNet", channels, image_size, stem_stride, width, dropout)
        if len(blocks) != len(channels) or any(int(b) < 1 for b in blocks):
            raise ConfigError(f"blocks={list(blocks)} must give a positive block count for "
                              f"each of the {len(channels)} stages in model.channels")
        layers: list[nn.Module] = [stem(in_channels, channels[0], stem_stride)]
        previous = channels[0]
        for i, (c, n) in enumerate(zip(channels, blocks)):
            for j in range(int(n)):
                layers.append(BasicBlock(previous, c, 2 if (i > 0 and j == 0) else 1))
                previous = c
        self.set_layers(layers, previous, num_classes, dropout)
