"""How each process of the node lives: until SIGINT or SIGTERM asks it to stop.

`serve` (in one process or as the supervisor of serve processes), each serve process and
each analysis worker run under `run_until_signalled`. Imports nothing of node.process, so
every process module may import it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_until_signalled(
    start: Callable[[], None], stop: Callable[[], None], what: str = "node"
) -> int:
    """Call `start`, wait for SIGINT or SIGTERM, call `stop`; returns the exit code.

    The handlers stay installed until the process exits: a second signal during the
    shutdown (an impatient supervisor) must not kill it halfway through.
    """
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping the %s", signal.Signals(signum).name, what)
        stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    start()
    try:
        while not stop_requested.wait(timeout=1.0):
            pass
    finally:
        stop()
    return 0
