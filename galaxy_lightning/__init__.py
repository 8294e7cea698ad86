"""galaxy_lightning: galaxy morphology classifiers as PyTorch Lightning + Hydra experiments."""

import os

from omegaconf import OmegaConf

# `${cwd:}` in conf/paths: the directory the run was launched from. Hydra's own
# `${hydra:runtime.cwd}` is not set yet when a multirun resolves its sweep directory.
if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)


def _fast_precision(accelerator: str = "auto") -> str:
    from galaxy_lightning.perf import fast_precision  # torch is imported only when resolved

    return fast_precision(accelerator)


# `${fast_precision:${trainer.accelerator}}` in conf/perf/fast.yaml: bfloat16 where this machine
# computes in it, float32 (CPU) or float16 (older GPUs) where it would be emulated.
if not OmegaConf.has_resolver("fast_precision"):
    OmegaConf.register_new_resolver("fast_precision", _fast_precision)
