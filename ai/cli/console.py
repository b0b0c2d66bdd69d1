"""What the classifier's commands show while they work.

On a terminal, a progress bar; written to a file, a few plain log lines instead, so a log
does not fill with bar fragments. Warnings that libraries raise about themselves (torch's
deprecations, pandas' options) go to the log at DEBUG: a user cannot act on them, and they
bury the lines that matter. The project's own warnings are shown as usual.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

OWN_PACKAGES = ("ai", "node", "storage")
_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds ai/, node/, storage/
_OWN_FOLDERS = tuple(str(_ROOT / package) for package in OWN_PACKAGES)
LOG_EVERY_SECONDS = 10.0


def interactive() -> bool:
    """Whether a person watches: progress bars only make sense on a terminal."""
    return sys.stderr.isatty()


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "file"
) -> Iterator[T]:
    """Iterate `items` with a progress bar on a terminal, or log lines (at the start, then
    at most every `LOG_EVERY_SECONDS`, and at the end) when the output goes to a file."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr)
        return
    of_total = f"/{total}" if total is not None else ""
    started = last = time.monotonic()
    log.info("%s: 0%s %ss", desc, of_total, unit)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_SECONDS:
            log.info("%s: %d%s %ss (%.0f s)", desc, done, of_total, unit, now - started)
            last = now
    log.info("%s: %d%s %ss done in %.1f s", desc, done, of_total, unit, time.monotonic() - started)


def _is_own(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_OWN_FOLDERS)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _is_own(filename):
        stream = file or sys.stderr
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    log.debug("%s from %s:%d: %s", category.__name__, filename, lineno, message)


def route_library_warnings() -> None:
    """Send warnings raised outside this project to the log at DEBUG (for this process)."""
    warnings.showwarning = _show_warning
