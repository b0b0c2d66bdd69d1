"""Wake pynetdicom's reactors when there is work, instead of after their next 1 ms nap.

An acceptor association runs two polling loops: the DUL reactor sleeps
`_run_loop_delay` (1 ms) whenever it found nothing to do, and the association reactor
sleeps 1 ms before each look for a decoded DIMSE message. Every C-STORE therefore waits up
to a millisecond for the request to be noticed and again for the response to be sent: a
third of the time of a 134 KB image on one association. Here the naps become waits that end
early:

- the DUL reactor's nap is a `select` on the peer's socket and a wake-up socket that is
  written whenever a primitive (a response, a release, an abort) is queued for it;
- the association reactor's nap is a wait on its DIMSE message queue, which `put` wakes.

Neither loop spins: an idle association wakes once a millisecond as before. The sleeps are
reached through the `time` name of pynetdicom's `dul` and `association` modules, which
`install` points at a clock whose `sleep` knows these threads; any other caller (requestor
associations, pynetdicom's own waits) sleeps as before. `tests/test_guarded_transport.py`
pins the pynetdicom code this relies on.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom.association
import pynetdicom.dul

# The nap each pynetdicom loop takes when it found nothing to do.
ASSOCIATION_REACTOR_NAP = 0.001


class WakingQueue(queue.Queue):
    """A queue whose `put` also writes a byte to a wake-up socket (the DUL's to-do list)."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with contextlib.suppress(OSError):
            self._wake.send(b"\0")


class _ReactorClock:
    """Stands in for the `time` module in pynetdicom's dul and association modules."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        waker = getattr(thread, "_pneumonode_waker", None)
        if waker is None:
            self._real.sleep(seconds)
        else:
            waker(seconds)


def install() -> None:
    """Point pynetdicom's dul and association modules at the waking clock (idempotent)."""
    for module in (pynetdicom.dul, pynetdicom.association):
        if not isinstance(module.time, _ReactorClock):
            module.time = _ReactorClock(time)


def make_responsive(assoc: Any) -> socket.socket:
    """Wire a freshly made acceptor association's two reactors to wake on work.

    Returns the wake-up socket pair's reading end; `close_wakeups` closes it when the
    association has ended.
    """
    install()
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    dul = assoc.dul
    dul.to_provider_queue = WakingQueue(wake_write)
    dul._pneumonode_wake_write = wake_write

    def dul_nap(seconds: float) -> None:
        peer = dul.socket.socket if dul.socket is not None else None
        watched = [wake_read] if peer is None else [wake_read, peer]
        try:
            ready, _, _ = select.select(watched, [], [], seconds)
        except (OSError, ValueError):
            time.sleep(seconds)  # the peer's socket was closed under us
            return
        if wake_read in ready:
            with contextlib.suppress(OSError):
                wake_read.recv(4096)

    messages = assoc.dimse.msg_queue

    def association_nap(seconds: float) -> None:
        if seconds != ASSOCIATION_REACTOR_NAP:
            time.sleep(seconds)
            return
        with messages.not_empty:
            if not messages._qsize():
                messages.not_empty.wait(seconds)

    dul._pneumonode_waker = dul_nap
    assoc._pneumonode_waker = association_nap
    return wake_read


def close_wakeups(assoc: Any, wake_read: socket.socket) -> None:
    """Close an ended association's wake-up sockets."""
    wake_read.close()
    wake_write = getattr(assoc.dul, "_pneumonode_wake_write", None)
    if wake_write is not None:
        wake_write.close()
