"""Classifiers: plain ``nn.Module``s that map (N, C, H, W) float images to (N, K) logits.

Every model takes ``in_channels``, ``num_classes`` and ``image_size`` (filled in from the data)
plus its own options from the ``model`` config group.
"""

from galaxy_lightning.models.tutorial_cnn import TutorialCNN

__all__ = ["TutorialCNN"]
