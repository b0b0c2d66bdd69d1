"""Wake pynetdicom's reactors when there is work, instead of after their next 1 ms nap.

An acceptor association runs two polling loops: the DUL reactor sleeps `_run_loop_delay`
(1 ms) whenever it found nothing to do, and the association reactor sleeps 1 ms before each
look for a decoded DIMSE message. Every C-STORE therefore waits up to a millisecond for the
request to be noticed and again for the response to be sent: a third of the time of a
134 KB image on one association. Here the naps become waits that end early:

- the DUL reactor's nap is a `select` on the peer's socket and a wake-up socket that is
  written whenever a primitive (a response, a release, an abort) is queued for it, an
  event is queued for its state machine, or it is told to stop; this also serves the
  node's own requestor associations (results, C-MOVE sub-operations);
- an acceptor's association reactor naps on its DIMSE message queue, which wakes it when
  a message is queued, when the DUL queues a primitive for it (the peer's release or
  abort) and when it is told to stop.

Each nap lasts up to WOKEN_NAP_SECONDS (20 ms), not 1 ms: with four associations in two
serve processes, the 1 ms wake-ups of reactors with nothing to do were ~60 `select`s and
~50 GIL hand-overs per stored image, taken from the thread doing the storing. TLS keeps
decrypted bytes in its own buffer, out of `select`'s sight: the DUL does not nap while any
wait there.

A requestor's DUL woken at once exposes a pynetdicom race: `send_c_store` pauses the
association reactor by clearing a checkpoint and waiting for `_is_paused`, but the reactor
may already be past the checkpoint, about to read its DIMSE queue without blocking; a
response that arrives in that gap is taken as an unexpected request and the sender waits for
its DIMSE timeout (a CI run saw it). `keep_responses_for_the_sender` closes the gap: while
the checkpoint is cleared the reactor's read finds nothing, so the response stays queued for
the `get_msg(block=True)` of the send that paused it.

Neither loop spins: an idle association wakes every WOKEN_NAP_SECONDS. The sleeps are
reached through the `time` name of pynetdicom's `dul` and `association` modules, which
`install` points at a clock whose `sleep` knows these threads; any other caller (pynetdicom's
own waits) sleeps as before. `tests/test_guarded_transport.py` pins the pynetdicom code this
relies on.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom.association
import pynetdicom.dul

# The nap each pynetdicom loop takes when it found nothing to do.
ASSOCIATION_REACTOR_NAP = 0.001
# How long a woken reactor waits for work instead: everything that gives it work wakes it,
# so this bounds only what no wake-up covers (pynetdicom's ARTIM and idle timers, looked at
# once per loop, whose periods are seconds).
WOKEN_NAP_SECONDS = 0.02


def wake_on_put(
    to_do: queue.Queue, wake: socket.socket, reader: threading.Thread | None = None
) -> None:
    """Make `to_do.put` also write a byte to `wake` (the DUL's list of primitives to send,
    its state machine's events), unless the put comes from `reader`: the DUL queueing an
    event for itself is awake already, and looks at the queue before it naps.

    The queue object stays the same (its `put` is wrapped on the instance), so nothing
    already queued, or queued by another thread meanwhile, can be lost.
    """
    put = to_do.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        if reader is not None and threading.current_thread() is reader:
            return
        with contextlib.suppress(OSError):
            wake.send(b"\0")

    to_do.put = put_and_wake  # type: ignore[method-assign]


def wake_association_on_put(primitives: queue.Queue, messages: queue.Queue) -> None:
    """Make `primitives.put` (the DUL's queue to the user) also wake whoever waits for
    `messages` (the association reactor's DIMSE queue)."""
    put = primitives.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        with messages.not_empty:
            messages.not_empty.notify_all()

    primitives.put = put_and_wake  # type: ignore[method-assign]


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


def wake_dul_on_work(assoc: Any) -> None:
    """Make an association's DUL reactor nap on its socket and its to-do list, so it
    wakes when a PDU arrives or a primitive is queued."""
    install()
    dul = assoc.dul
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    wake_on_put(dul.to_provider_queue, wake_write)
    wake_on_put(dul.event_queue, wake_write, reader=dul)
    kill_dul, stop_dul = dul.kill_dul, dul.stop_dul

    def kill_and_wake() -> None:
        kill_dul()
        with contextlib.suppress(OSError):
            wake_write.send(b"\0")

    def stop_and_wake() -> bool:
        # pynetdicom's stop_dul sets the kill flag (in Sta1) and waits for the reactor:
        # the flag is set first here so that the woken reactor sees it.
        if dul.state_machine.current_state == "Sta1":
            kill_and_wake()
        return stop_dul()

    dul.kill_dul = kill_and_wake
    dul.stop_dul = stop_and_wake

    def close() -> None:
        wake_read.close()
        wake_write.close()

    def dul_nap(seconds: float) -> None:
        if wake_read.fileno() < 0:  # closed: the association is over
            time.sleep(seconds)
            return
        peer = dul.socket.socket if dul.socket is not None else None
        if isinstance(peer, ssl.SSLSocket) and peer.pending():
            return  # decrypted bytes wait in the TLS layer, where select cannot see them
        watched = [wake_read] if peer is None else [wake_read, peer]
        try:
            ready, _, _ = select.select(watched, [], [], max(seconds, WOKEN_NAP_SECONDS))
        except (OSError, ValueError):
            time.sleep(seconds)  # the peer's socket was closed under us
            ready = []
        if wake_read in ready:
            with contextlib.suppress(OSError):
                wake_read.recv(4096)
        if dul._kill_thread:  # the reactor stops after this nap
            close()

    dul._pneumonode_waker = dul_nap
    dul._pneumonode_close_wakeups = close


def make_responsive(assoc: Any) -> None:
    """Wire a freshly made acceptor association's two reactors to wake on work."""
    wake_dul_on_work(assoc)
    messages = assoc.dimse.msg_queue
    # A release or abort from the peer reaches the reactor on the DUL's queue to the user,
    # not on the DIMSE message queue: it wakes the reactor too.
    wake_association_on_put(assoc.dul.to_user_queue, messages)
    kill = assoc.kill

    def kill_and_wake() -> None:
        assoc._kill = True  # what kill() sets first: the woken reactor must see it
        with messages.not_empty:
            messages.not_empty.notify_all()
        kill()

    assoc.kill = kill_and_wake

    def association_nap(seconds: float) -> None:
        if seconds != ASSOCIATION_REACTOR_NAP:
            time.sleep(seconds)
            return
        with messages.not_empty:
            if not messages._qsize() and not assoc.dul.to_user_queue.qsize():
                messages.not_empty.wait(WOKEN_NAP_SECONDS)

    assoc._pneumonode_waker = association_nap


def keep_responses_for_the_sender(assoc: Any) -> None:
    """Make the association reactor's non-blocking read of the DIMSE queue find nothing
    while a `send_*` of pynetdicom has paused it (its checkpoint cleared): the response
    is the sender's, not a request for the reactor to serve."""
    dimse = assoc.dimse
    get_msg = dimse.get_msg
    checkpoint = assoc._reactor_checkpoint

    def get_msg_unless_paused(block: bool = False) -> Any:
        if not block and not checkpoint.is_set():
            return None, None
        return get_msg(block)

    dimse.get_msg = get_msg_unless_paused


def wake_requestor(assoc: Any) -> None:
    """Wire one of the node's requestor associations, once established, to wake on work;
    its association reactor naps until `pause_reactor` nudges it."""
    if hasattr(assoc.dul, "_pneumonode_waker"):
        return
    keep_responses_for_the_sender(assoc)
    wake_dul_on_work(assoc)
    nudge = threading.Event()

    def association_nap(seconds: float) -> None:
        if seconds != ASSOCIATION_REACTOR_NAP:
            time.sleep(seconds)
            return
        nudge.wait(seconds)
        nudge.clear()

    assoc._pneumonode_waker = association_nap
    assoc._pneumonode_nudge = nudge


def pause_reactor(assoc: Any) -> None:
    """Pause the association reactor as pynetdicom's `send_*` do (clear its checkpoint, wait
    until it stops there), nudging a requestor's reactor out of its nap so that the wait
    is not the rest of a millisecond."""
    assoc._reactor_checkpoint.clear()
    nudge = getattr(assoc, "_pneumonode_nudge", None)
    if nudge is not None:
        nudge.set()
    while not assoc._is_paused and assoc.is_established:
        time.sleep(0.0001)


def close_wakeups(assoc: Any) -> None:
    """Close an ended association's wake-up sockets (closing twice is harmless)."""
    close = getattr(assoc.dul, "_pneumonode_close_wakeups", None)
    if close is not None:
        close()
