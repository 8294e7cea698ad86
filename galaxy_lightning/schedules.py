"""Learning-rate schedules, stepped once per optimizer step (Lightning ``interval: step``).

``conf/scheduler/`` selects one: ``none`` (the tutorial's constant rate), ``cosine`` (linear
warm-up, then cosine decay; :func:`warmup_cosine`) or ``onecycle`` (torch's ``OneCycleLR``).
Each config is a ``_partial_`` callable that takes the optimizer.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from galaxy_lightning.errors import ConfigError


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_fraction: float = 0.05, final_lr_fraction: float = 0.0) -> LambdaLR:
    """Linear warm-up from ~0 to the optimizer's rate over the first ``warmup_fraction`` of
    ``total_steps``, then a cosine decay to ``final_lr_fraction`` of it at ``total_steps``.
    (A fraction, not a step count, so the same config serves a 100-step test and a long run.)

    Why warm-up: Adam's first steps use poorly estimated second moments, and BatchNorm statistics
    are still moving; a short ramp avoids a destructive first update at a high rate.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps} must be positive (a schedule needs a "
                          "step limit: trainer.max_steps=N, or trainer.max_steps=-1 with "
                          "length={epochs: E, min_steps: S})")
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"warmup_fraction={warmup_fraction} must be in [0, 1)")
    warmup_steps = int(round(warmup_fraction * total_steps))
    if not 0 <= final_lr_fraction <= 1:
        raise ConfigError(f"final_lr_fraction={final_lr_fraction} must be in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = LambdaLR(optimizer, factor)
    scheduler.warmup_steps = warmup_steps  # read by the run's stability figure (RunArtifacts)
    return scheduler
