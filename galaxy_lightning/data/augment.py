"""Augmentations that respect the sky, on whole batches as tensor ops (no per-sample Python).

A galaxy has no preferred orientation on the sky and no preferred position within a few pixels of
the cutout centre, so rotated, flipped and slightly shifted images are as real as the originals:

- :func:`dihedral` / :func:`random_dihedral`: the 8 symmetries of the square (rotations by
  multiples of 90 degrees, with or without a flip). They move pixels without interpolating, so
  they are exact and also serve test-time augmentation (:func:`dihedral_views`).
- :func:`random_rotate_shift`: rotation by an arbitrary angle and a sub-pixel shift, one affine
  resampling per batch (bilinear, reflected borders: rotating a square frame would otherwise
  bring in black corners that real cutouts never have). With ``dihedral`` as well, the symmetry
  is folded into the same resampling: a uniform angle already includes the quarter turns, so only
  a random mirror is left, one sign in the affine matrix (the same distribution of images as a
  symmetry followed by a rotation, without the index copies of the uint8 batch: 18.5 -> 12.3 ms
  per batch of 128 96 px images on 2 cores, medians of 6 alternated rounds).

:func:`mixup` (Zhang et al. 2018) is of another kind: it blends pairs of training images and
their targets, so the model sees galaxies that do not exist; it is off unless asked for
(``data.mixup=0.2``), measured on the small set in the README.

:class:`Augmentation` composes them from one list of names (``data.augment=[dihedral,shift]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from galaxy_lightning.errors import ConfigError

#: The augmentations :class:`Augmentation` knows, in the order they are applied.
AUGMENTATIONS = ("dihedral", "rotate", "shift")
#: The largest shift (pixels) that keeps a centred galaxy in a cutout.
MAX_SHIFT_LIMIT = 8.0

#: The largest mixup parameter accepted (Beta(a, a) with a > 1 blends most pairs near half-half).
MIXUP_LIMIT = 4.0


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image and its (N, K) target probabilities with those of another image of the
    batch: lam x_i + (1 - lam) x_perm(i), one lam ~ Beta(alpha, alpha) per batch.

    lam is taken as max(lam, 1 - lam) (as fastai does): the same pairs, but each image stays the
    larger part of its blend, so accuracy against the batch's own labels still means something."""
    # torch's Beta sampler takes no generator: draw it with numpy, seeded from ours, so the
    # weight follows the (checkpointed) generator like every other draw here
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    mixed = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
    return mixed, targets.mul(lam).add_(targets[perm], alpha=1.0 - lam)


def dihedral(images: torch.Tensor, k: int, dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k = 0..7): a rotation by (k mod 4) x 90
    degrees, preceded by a horizontal flip when k >= 4. ``dims`` are the (height, width) axes:
    (1, 2) for the uint8 NHWC store, (2, 3) for NCHW model input."""
    if k >= 4:
        images = images.flip(dims[1])
    return torch.rot90(images, k % 4, dims=dims)


def random_dihedral(images: torch.Tensor, generator: torch.Generator | None = None,
                    dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Each image of the batch under its own random symmetry of the square (8 tensor ops per batch)."""
    choice = torch.randint(0, 8, (len(images),), generator=generator, device="cpu").to(images.device)
    out = torch.empty_like(images)
    for k in range(8):
        index = torch.nonzero(choice == k).flatten()
        if len(index):
            out[index] = dihedral(images[index], k, dims)
    return out


def dihedral_views(images: torch.Tensor) -> torch.Tensor:
    """All 8 symmetric views of an NCHW batch, stacked view-major: (8 N, C, H, W)."""
    return torch.cat([dihedral(images, k, (2, 3)) for k in range(8)])


def rotate_shift(images: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor,
                 mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Float NCHW images, image i mirrored left-right if ``mirror[i]``, then rotated
    counter-clockwise (as displayed, row 0 at the top) by ``angle[i]`` radians about its centre
    and moved by ``shift[i] = (dx, dy)`` pixels (right, down), in one ``grid_sample`` (bilinear,
    reflected borders)."""
    n, _, h, w = images.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output to input coordinates, normalised to [-1, 1] across the image (x right,
    # y down): input = M R(-angle) (output - shift), with a shift of s pixels being 2 s / size
    # and M the mirror x -> -x where asked (its row of theta changes sign).
    tx, ty = 2 * shift[:, 0] / w, 2 * shift[:, 1] / h
    sign = 1 - 2 * mirror.to(cos.dtype) if mirror is not None else torch.ones_like(cos)
    theta = torch.stack([sign[:, None] * torch.stack([cos, -sin, -(cos * tx - sin * ty)], 1),
                         torch.stack([sin, cos, -(sin * tx + cos * ty)], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def random_rotate_shift(images: torch.Tensor, max_shift: float, rotate: bool,
                        generator: torch.Generator | None = None,
                        mirror: bool = False) -> torch.Tensor:
    """Each image mirrored with probability 1/2 (if ``mirror``), rotated by a uniform random
    angle (if ``rotate``) and shifted by a uniform random offset of up to ``max_shift`` pixels
    along each axis (:func:`rotate_shift`). ``mirror`` and ``rotate`` together draw each image's
    symmetry of the square and its rotation at once: any symmetry followed by a uniform rotation
    is a uniform rotation of the image or of its mirror."""
    n = len(images)
    angle = torch.rand(n, generator=generator) * 2 * math.pi if rotate else torch.zeros(n)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    flips = torch.rand(n, generator=generator) < 0.5 if mirror else None
    return rotate_shift(images, angle, shift, flips)


class Augmentation:
    """The training augmentations named in ``names`` (any of :data:`AUGMENTATIONS`), applied to
    whole batches with one seeded generator (its state is part of the DataModule's state).

    ``rotate`` (a uniform angle) and ``shift`` (up to ``max_shift`` pixels per axis) resample the
    float batch after preprocessing, in one ``grid_sample``; ``dihedral`` with ``rotate`` is a
    random mirror in that same resampling. ``dihedral`` without ``rotate`` works on the uint8
    NHWC batch before preprocessing (it moves whole pixels: exact, and 4x fewer bytes than
    floats).
    """

    def __init__(self, names: str | Sequence[str] = (), max_shift: float = 2.0,
                 seed: int = 0, mixup: float = 0.0) -> None:
        if isinstance(names, str):  # one name, or "none" (what a sweep's choice() can pass)
            names = [] if names == "none" else [names]
        names = list(names)
        unknown = [n for n in names if n not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"augment={names}: unknown {unknown}; choose from "
                              f"{list(AUGMENTATIONS)} (a list, e.g. [dihedral, shift]; [] for none)")
        if not 0 < max_shift <= MAX_SHIFT_LIMIT:
            raise ConfigError(f"max_shift={max_shift} must be in (0, {MAX_SHIFT_LIMIT:g}] pixels")
        if isinstance(mixup, bool) or not isinstance(mixup, (int, float)) or \
                not 0 <= mixup <= MIXUP_LIMIT:
            raise ConfigError(f"mixup={mixup} must be 0 (off) or the Beta(a, a) parameter a of the "
                              f"blend, in (0, {MIXUP_LIMIT:g}] (0.2-0.4 is usual)")
        self.names = [n for n in AUGMENTATIONS if n in names]
        self.max_shift = float(max_shift)
        self.mixup = float(mixup)
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def __bool__(self) -> bool:
        return bool(self.names) or self.mixup > 0

    def mix(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input and (N, K) class probabilities -> their mixup blend (with this
        augmentation's generator, so a resumed run blends as the uninterrupted one would)."""
        return mixup(x, targets, self.mixup, self.generator)

    def __call__(self, images: torch.Tensor,
                 preprocess: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """uint8 NHWC training batch -> augmented float model input (``preprocess`` in between;
        the blend of :meth:`mix` is separate, as it changes the targets too)."""
        rotate, shift = "rotate" in self.names, "shift" in self.names
        symmetry = "dihedral" in self.names
        if symmetry and not rotate:
            images = random_dihedral(images, self.generator)
        x = preprocess(images)
        if rotate or shift:
            x = random_rotate_shift(x, self.max_shift if shift else 0.0, rotate, self.generator,
                                    mirror=symmetry and rotate)
        return x
