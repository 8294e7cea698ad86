"""Train a galaxy classifier: ``python train.py [group=option ...] [key=value ...]``.

Hydra composes ``conf/train.yaml``; see the README for the config groups. The return value (the
metric named by ``optimized_metric``) is what Hydra sweepers optimise.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from galaxy_lightning.errors import GalaxyError
from galaxy_lightning.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except GalaxyError as err:
        # A user's mistake: one line naming the file or key and the fix, no traceback.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
