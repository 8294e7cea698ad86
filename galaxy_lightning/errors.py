"""The exceptions users see, and the one boundary that prints them.

Library code raises these with a complete, one-line message worded for any caller (a Python user
or the command line): what is wrong, with which file or parameter, and the fix. The entry points
(``galaxy-train``/``train.py``, ``galaxy-evaluate``, ``galaxy-predict``, ``galaxy-export``) are
the only places that catch them: :func:`cli_boundary` prints ``error: <message>`` and exits 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

from galaxy_lightning.console import quiet_third_party

P = ParamSpec("P")
R = TypeVar("R")

#: Exit status of a run refused for bad input (argparse and Hydra use 2 for usage errors too).
EXIT_BAD_INPUT = 2
#: Exit status after Ctrl-C, as the shell reports it (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: Exit status after SIGTERM (a cluster's pre-emption, ``kill``), as the shell reports it
#: (128 + 15).
EXIT_TERMINATED = 143


class GalaxyError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(GalaxyError, ValueError):
    """An invalid parameter value or combination. Constructors raise it naming the parameter
    (``depth=0 must be at least 1``); :func:`config_key` prefixes the config key it came from."""


class DataError(GalaxyError):
    """A data file (source, prepared file, catalog, image) is missing, unreadable or
    inconsistent; the message names the file."""


class TrainingDiverged(GalaxyError):
    """The training loss became NaN or infinite: the run stops at once (nothing after it can be
    trusted), naming the step, the loss and the settings to change."""


class CheckpointError(GalaxyError):
    """A checkpoint is missing, unreadable, or does not fit the model or data it is used with."""


@contextmanager
def config_key(key: str) -> Iterator[None]:
    """Prefix a :class:`GalaxyError` raised inside with the config key whose values caused it:
    ``depth=0 must be at least 1`` becomes ``model: depth=0 must be at least 1``, so a command-line
    user knows which ``key=value`` to change. The exception keeps its class."""
    try:
        yield
    except GalaxyError as err:
        raise type(err)(f"{key}: {err}") from None


def cli_boundary(main: Callable[P, R]) -> Callable[P, R]:
    """Decorate an entry point: a :class:`GalaxyError` becomes ``error: <message>`` on stderr and
    exit status 2, Ctrl-C one line and exit status 130; every other exception propagates
    unchanged. Third-party banners and known
    dependency warnings are hidden (:mod:`galaxy_lightning.console`)."""

    @wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        quiet_third_party()
        try:
            return main(*args, **kwargs)
        except GalaxyError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            # Ctrl-C outside training (a download, a preparation): every file is written to a
            # temporary name first, so what was interrupted left nothing half-written behind.
            print("interrupted: nothing half-written was left; run the same command again to "
                  "continue", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapper
