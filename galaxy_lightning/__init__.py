"""galaxy_lightning: galaxy morphology classifiers as PyTorch Lightning + Hydra experiments."""

import os

from omegaconf import OmegaConf

# `${cwd:}` in conf/paths: the directory the run was launched from. Hydra's own
# `${hydra:runtime.cwd}` is not set yet when a multirun resolves its sweep directory.
if not OmegaConf.has_resolver("cwd"):
    OmegaConf.register_new_resolver("cwd", os.getcwd)
