"""The input contract between data and model: what an image must look like to enter the network.

In the spirit of timm's ``pretrained_cfg``, one :class:`InputSpec` travels with the data and the
model: a data source writes it into the prepared file's header, the LightningModule stores it as
one hyperparameter, and every consumer (the DataModule, evaluation, prediction, export) turns
pixels into model input through the same two pieces of code:

- :meth:`InputSpec.conform`: source images of any size -> the training geometry (center crop,
  then resize), the one implementation of crop and resize;
- :class:`Preprocess`: uint8 ``(N, H, W, C)`` -> float ``(N, C, H, W)`` in channels-last memory,
  scaled; the one implementation of the conversion, also inside exported models.

``stretch`` records how floating-point survey pixels (FITS) were mapped to uint8 and ``fits``
how they were read (the HDU, the NaN fill), so that new images are read and stretched exactly as
the training images were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galaxy_lightning.errors import ConfigError

#: The tutorial's pixel scaling: uint8 / 256.
DEFAULT_SCALE = 1.0 / 256.0
#: How FITS files were read: the HDU (number or name) and the NaN policy (data/images.py).
FITS_READING_KEYS = ("hdu", "nan")


#: How a source's ``display`` option may show 8-bit pixels to a person (figures only).
DISPLAYS = (None, "linear", "asinh")


def check_source_options(**options: Any) -> None:
    """The options every data source shares: ``crop``, ``resize`` and ``n_per_class`` are
    positive integers or null; ``display`` one of :data:`DISPLAYS`."""
    for name, value in options.items():
        if name == "display":
            if value not in DISPLAYS:
                raise ConfigError(f"display={value!r} must be null, 'linear' or 'asinh'")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}={value} must be a positive integer or null")


class SizeMismatch(ConfigError):
    """An image whose size the training geometry does not cover (and no resize was allowed)."""


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` window of (n, H, W, C) images (a view, no copy)."""
    h, w = images.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (n, H, W, C) uint8 images to ``size`` x ``size`` (antialiased bilinear)."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class InputSpec:
    """What the network takes and how source images were made into it.

    ``crop`` and ``resize`` are the geometry applied to source images (center crop to ``crop``
    pixels, then resize to ``resize``); ``image_size`` is the side of the square the network sees.
    ``scale`` multiplies uint8 pixels. ``stretch`` (optional) says how floating-point pixels were
    mapped to uint8, ``fits`` (optional, ``{"hdu": 0, "nan": "median"}``) how FITS files were read;
    ``display`` (optional) how to show the uint8 pixels to a person; ``tree`` (optional) the
    Galaxy Zoo decision tree of the data's vote counts, so that a model and its exports carry it.
    """

    class_names: tuple[str, ...]
    channels: int
    image_size: int
    crop: int | None = None
    resize: int | None = None
    scale: float = DEFAULT_SCALE
    stretch: dict[str, Any] | None = None
    display: dict[str, Any] | None = field(default=None)
    fits: dict[str, Any] | None = None
    #: the Galaxy Zoo decision tree whose vote counts the data carries (``DecisionTree.to_dict``)
    tree: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if len(self.class_names) < 2:
            raise ConfigError(f"class_names={list(self.class_names)}: a classifier needs at least 2 "
                              "classes")
        if self.channels < 1 or self.image_size < 1:
            raise ConfigError(f"channels={self.channels}, image_size={self.image_size} must be "
                              "positive")
        if self.resize is not None and self.resize != self.image_size:
            raise ConfigError(f"resize={self.resize} must equal image_size={self.image_size}")
        if self.resize is None and self.crop is not None and self.crop != self.image_size:
            raise ConfigError(f"crop={self.crop} without a resize must equal image_size="
                              f"{self.image_size}")
        if not self.scale > 0:
            raise ConfigError(f"scale={self.scale} must be positive")
        if self.tree is not None:
            from galaxy_lightning.decision_tree import DecisionTree  # (it imports this module's errors)

            DecisionTree.from_dict(self.tree)
        if self.fits is not None and set(self.fits) - set(FITS_READING_KEYS):
            raise ConfigError(f"input spec fits={self.fits}: takes only {list(FITS_READING_KEYS)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- serialisation (checkpoint hyperparameters, the prepared file's header, model.json) -------
    def to_dict(self) -> dict[str, Any]:
        """Primitives only (lists, not tuples), so checkpoints load with ``weights_only``.

        ``fits`` and ``tree`` are left out when there are none, so a spec without them is the
        same dict as before the fields existed (resuming compares the checkpoint's spec with the data's)."""
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        for optional in ("fits", "tree"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """The spec of :meth:`to_dict`; fields it lacks (written by older versions) default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"input spec has unknown fields {unknown}; it was written by a newer "
                              "galaxy_lightning: upgrade")
        return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()})

    def replace(self, **changes: Any) -> InputSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_source(cls, class_names: Sequence[str], height: int, width: int, channels: int,
                   crop: int | None, resize: int | None, source: str, display: str | None = None,
                   **fields: Any) -> InputSpec:
        """The spec of a data source whose images are ``height`` x ``width``: the one rule, for
        every source, of how the ``crop`` and ``resize`` options make them square (a center crop
        to ``crop``; without one, of the largest square when a ``resize`` is asked for; square
        images as they are). ``source`` names the images in errors; ``display`` is the source's
        display option (null, 'linear', 'asinh'); ``fields`` are the other spec fields."""
        check_source_options(crop=crop, resize=resize, display=display)
        if crop is not None and (crop > height or crop > width):
            raise ConfigError(f"crop={crop} is larger than the {height}x{width} images of "
                              f"{source}; lower it or set it to null")
        if crop is None and height != width:
            if resize is None:
                raise ConfigError(f"{source}: images are {height}x{width}; set crop to a square "
                                  f"size of at most {min(height, width)} (and resize, if you like)")
            crop = min(height, width)  # the largest centred square, then the resize
        side = crop or height
        return cls(class_names=tuple(class_names), channels=channels, image_size=resize or side,
                   crop=crop, resize=resize,
                   display={"stretch": display} if display else None, **fields)

    # -- geometry ----------------------------------------------------------------------------------
    def conform(self, images: np.ndarray, allow_resize: bool = False,
                adapt_channels: bool = True) -> np.ndarray:
        """Source images (n, H, W[, C]) uint8 -> (n, S, S, C) as training saw them.

        Channels: with ``adapt_channels`` (8-bit displays: PNG/JPEG, uint8 arrays) grayscale is
        repeated for a colour model and an alpha channel is dropped; without it (FITS bands, which
        are measurements, not a display) and for any other mismatch, refused. Geometry: images
        already S x S pass unchanged; larger ones get the training geometry, the center crop,
        then the resize (e.g. Galaxy10 DECaLS 256 -> 96). Any other size is refused with :class:`ConfigError` unless ``allow_resize``, which
        center-crops the largest square and resizes it to S.
        """
        if images.ndim == 3:
            images = images[..., None]
        c = images.shape[-1]
        if c != self.channels:
            if adapt_channels and c == 1 and self.channels == 3:
                images = np.repeat(images, 3, axis=-1)
            elif adapt_channels and c == 4 and self.channels == 3:
                images = images[..., :3]
            else:
                raise ConfigError(f"has {c} channels; the model takes {self.channels}")
        h, w = images.shape[1:3]
        size = self.image_size
        if (h, w) == (size, size):
            return images
        if self.crop is not None and h >= self.crop and w >= self.crop:
            out = center_crop(images, self.crop)
            return resize_uint8(out, size) if self.crop != size else out
        if self.crop is None and self.resize is not None and h == w:
            return resize_uint8(images, size)
        if not allow_resize:
            how = ""
            if self.crop or self.resize:
                how = (f" (training {'cropped ' + str(self.crop) + ' px' if self.crop else ''}"
                       f"{' and ' if self.crop and self.resize else ''}"
                       f"{'resized to ' + str(self.resize) if self.resize else ''})")
            raise SizeMismatch(f"is {h}x{w}; the model takes {size}x{size}{how}; allow a resize to "
                               "center-crop and resize it")
        square = center_crop(images, min(h, w))
        return resize_uint8(square, size) if min(h, w) != size else square

    def matches(self, images_shape: Sequence[int]) -> bool:
        """Whether uint8 (n, H, W, C) images of this shape are model-ready."""
        return tuple(images_shape[1:]) == (self.image_size, self.image_size, self.channels)


class Preprocess(nn.Module):
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in channels-last memory, times ``scale``.

    Converting after the batch reaches the device moves 4x fewer bytes; the NHWC store becomes an
    NCHW tensor whose memory is channels-last, the fast layout for these convolutions on a CPU.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.scale = float(spec.scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # `.to` makes a new float tensor (the input is uint8), so scaling it in place is safe and
        # saves one batch-sized allocation per step.
        return images.permute(0, 3, 1, 2).to(torch.float32).mul_(self.scale)
