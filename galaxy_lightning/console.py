"""What a run prints: the lines that matter, not third-party banners and known deprecations;
progress bars only where a person watches them.

:func:`quiet_third_party` is applied by every entry point (:func:`~galaxy_lightning.errors.
cli_boundary`). It hides exactly the lines listed here, each a banner or a warning about code
that is not ours and that the user cannot act on; every other warning and log line stays.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

#: Log lines (by their start) that are advertisements, not information.
BANNERS = ("💡 Tip:",)
#: Warnings (message patterns) raised inside dependencies about their own internals, or about
#: a setting that is deliberate here.
KNOWN_WARNINGS = (
    # torch 2.13 deprecates an API that Lightning 2.6's pytree helper still calls
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # the data are tensors in memory, batched by index: worker processes would only add copies
    r".*does not have many workers.*",
)


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(BANNERS)


def quiet_third_party() -> None:
    """Hide :data:`BANNERS` and :data:`KNOWN_WARNINGS` in this process (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBanners) for f in logger.filters):
            logger.addFilter(_DropBanners())
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def progress(enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar for a long step (download, preparation, prediction) on a terminal; none when
    stderr is redirected to a file or pipe, where its carriage returns would pile up as
    fragments, or when ``enabled`` is false."""
    return tqdm(disable=None if enabled else True, **kwargs)


def print_config_tree(cfg: DictConfig, order: tuple[str, ...] = ("data", "model", "optimizer", "scheduler",
                                                        "trainer", "callbacks", "logger", "paths",
                                                        "perf")) -> None:
    """The composed run config as a tree (one branch per group), printed with rich, as the
    lightning-hydra-template does before a run starts."""
    # deferred: rich.syntax loads pygments, which only a printed tree needs
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch = tree.add(str(key), guide_style="dim")
        branch.add(rich.syntax.Syntax(text.rstrip() or "null", "yaml", theme="ansi_dark"))
    rich.print(tree)
