"""prometheus_client's multi-process mode for `serve` and the processes it spawns.

Every process of the node (the supervisor, serve processes, analysis workers, result
processes) counts in files of one folder, named by PROMETHEUS_MULTIPROC_DIR in the
environment that children inherit; the supervisor's /metrics sums them. The folder is made
fresh at each start (counts of an earlier run would add up wrongly) and removed at stop;
the folders of nodes killed before they could remove theirs go at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from storage.jobs import process_alive

log = logging.getLogger(__name__)

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"


def active() -> bool:
    return ENVIRONMENT in os.environ


def _remove_stale(parent: Path) -> None:
    """Folders of `serve`s that are gone (killed: no stop removed them)."""
    for folder in parent.glob("serve-*"):
        pid = folder.name.removeprefix("serve-").split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _memory_folder() -> Path:
    """/dev/shm (memory) where there is one: the counts' pages are never written back to
    a disk that the node's fsync of every received file also waits on."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def start_folder() -> Path:
    """Make an empty folder and name it in this process's environment, before any child
    process starts and before any metric is made."""
    parent = _memory_folder() / f"pneumonode-metrics-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    _remove_stale(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"serve-{os.getpid()}-", dir=parent))
    os.environ[ENVIRONMENT] = str(folder)
    _choose_value_class()
    return folder


def _choose_value_class() -> None:
    """prometheus_client picks in-memory or file values at import, from the environment:
    imported already, it picks again, for the metrics made from now on."""
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()


def remove_folder(folder: Path) -> None:
    if os.environ.get(ENVIRONMENT) == str(folder):
        del os.environ[ENVIRONMENT]
        _choose_value_class()
    shutil.rmtree(folder, ignore_errors=True)


def process_died(pid: int | None) -> None:
    """Forget the live gauges of a child process that exited (its counters stay counted)."""
    if pid is None or not active():
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)
