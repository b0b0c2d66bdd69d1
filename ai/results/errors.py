"""The one error a result builder's caller has to handle: which object could not be built,
and why, in a sentence short enough for `pneumonode status`.

The worker fails the image's job with this reason once; it never retries by itself, since
building the same object from the same source fails the same way.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class ResultBuildError(ValueError):
    """A result object could not be built from its source."""


@contextmanager
def building(what: str) -> Iterator[None]:
    """Turn any error raised while building `what` into a ResultBuildError that names it."""
    try:
        yield
    except ResultBuildError:
        raise
    except Exception as error:  # the builders and highdicom raise many types
        raise ResultBuildError(
            f"cannot build the {what}: {type(error).__name__}: {error}"
        ) from error
