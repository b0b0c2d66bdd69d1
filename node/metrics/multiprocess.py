"""prometheus_client's multi-process mode for `serve` and the processes it spawns.

Every process of the node (the supervisor, serve processes, analysis workers, result
processes) counts in files of one folder, named by PROMETHEUS_MULTIPROC_DIR in the
environment that children inherit; the supervisor's /metrics sums them. The folder is made
fresh at each start (counts of an earlier run would add up wrongly) and removed at stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"


def active() -> bool:
    return ENVIRONMENT in os.environ


def start_folder() -> Path:
    """Make an empty folder and name it in this process's environment, before any child
    process starts and before any metric is made."""
    folder = Path(tempfile.mkdtemp(prefix="pneumonode-metrics-"))
    os.environ[ENVIRONMENT] = str(folder)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported already: let metrics made from now on use the files
        values.ValueClass = values.get_value_class()
    return folder


def remove_folder(folder: Path) -> None:
    if os.environ.get(ENVIRONMENT) == str(folder):
        del os.environ[ENVIRONMENT]
    shutil.rmtree(folder, ignore_errors=True)


def process_died(pid: int | None) -> None:
    """Forget the live gauges of a child process that exited (its counters stay counted)."""
    if pid is None or not active():
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)
