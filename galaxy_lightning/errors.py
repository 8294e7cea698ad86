"""The one exception type users see: a one-line message that names the file or key and the fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException


class GalaxyError(Exception):
    """A problem with the user's input (config, data file, checkpoint), reported without a traceback."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a :class:`GalaxyError` that Hydra's ``instantiate`` wrapped (in an
    ``InstantiationException`` naming the target) as itself, so the user sees its one line."""
    try:
        yield
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, GalaxyError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
