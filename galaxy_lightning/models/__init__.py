"""Classifiers: plain ``nn.Module``s that map (N, C, H, W) float images to (N, K) logits.

Every model takes ``in_channels``, ``num_classes`` and ``image_size`` (filled in from the data)
plus its own options from the ``model`` config group:

- :class:`TutorialCNN` (``model=tutorial_cnn``): the course's 2,729-parameter reference;
- :class:`BNCNN` (``model=bn_cnn``): wider and deeper, with batch normalisation;
- :class:`ResNet` (``model=resnet``): a small residual network.
"""

from torch import nn

from galaxy_lightning.models.bn_cnn import BNCNN
from galaxy_lightning.models.resnet import ResNet
from galaxy_lightning.models.tutorial_cnn import TutorialCNN

__all__ = ["BNCNN", "ResNet", "TutorialCNN", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (what the README's tables and metrics.json's ``params`` count)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
