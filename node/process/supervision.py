"""How each process of the node lives: until SIGINT or SIGTERM asks it to stop, and, for a
child process, no longer than the process that started it.

`serve` (in one process or as the supervisor of serve processes), each serve process and
each analysis worker run under `run_until_signalled`. Every child process of the node (the
serve processes and the analysis workers that `serve` starts, the result processes of a
worker) calls `tie_to_parent` first thing, so that `kill -9` of `serve` leaves nothing
behind holding the port, claiming jobs or writing files. Imports nothing of node.process,
so every process module may import it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# How often a child looks whether the process that started it is still there.
PARENT_POLL_SECONDS = 0.5
ORPHANED_EXIT_STATUS = 1


def run_until_signalled(
    start: Callable[[], None],
    stop: Callable[[], None],
    what: str = "node",
    stop_requested: threading.Event | None = None,
) -> int:
    """Call `start`, wait for SIGINT or SIGTERM (or `stop_requested`, set by the process
    itself when it cannot go on), call `stop`; returns the exit code.

    The handlers stay installed until the process exits: a second signal during the
    shutdown (an impatient supervisor) must not kill it halfway through. A `start` that
    raises is followed by `stop` (what it started is stopped) and the error goes on up.
    """
    stop_requested = stop_requested or threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping the %s", signal.Signals(signum).name, what)
        stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        start()
    except BaseException:
        try:
            stop()
        except Exception:
            log.debug("error while stopping after a failed start", exc_info=True)
        raise
    try:
        while not stop_requested.wait(timeout=1.0):
            pass
    finally:
        stop()
    return 0


def tie_to_parent(parent_pid: int) -> None:
    """End this process as soon as `parent_pid`, the process that started it, is gone.

    `parent_pid` is what the parent passed (its os.getpid()): a child whose parent died
    before this call has already been re-parented, and ends at once. The end is abrupt
    (os._exit), as if killed with its parent: there is no one left to report to, and what
    it leaves (claimed jobs, temporary files) is what the next start recovers after a
    crash anyway.

    A thread watching getppid() rather than PR_SET_PDEATHSIG: that signal fires when the
    parent *thread* that started the child ends, and the node starts children from threads
    that end before the process does (the monitors that restart a dead child, the analysis
    thread that replaces a broken result pool).
    """
    if os.getppid() != parent_pid:
        os._exit(ORPHANED_EXIT_STATUS)
    threading.Thread(
        target=_end_with_parent, args=(parent_pid,), name="parent-watch", daemon=True
    ).start()


def _end_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    try:
        log.warning("parent process %d is gone; exiting", parent_pid)
    finally:
        os._exit(ORPHANED_EXIT_STATUS)
