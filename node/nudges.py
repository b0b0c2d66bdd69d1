"""Nudges between the node's processes: "new work is in the database, look now".

The result sender runs in `serve`'s supervisor, while the deliveries it sends are queued
by the analysis worker, another process. Polling the queue often would take the index's
write lock many times a second beside ingest, so the sender polls slowly and is nudged
instead: whoever commits new deliveries sends one byte to a datagram socket the sender
listens on. A lost nudge costs nothing but the wait until the next poll, so sending never
blocks and never fails loudly.

The socket is in Linux's abstract namespace (no file in the storage folder, none left
behind by a crash), named after the storage folder, so that only processes sharing that
folder nudge each other. Elsewhere (another OS, or a second listener on the same folder)
there is no socket to listen on and the listener just waits out its poll interval.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The result sender's: deliveries were queued.
DELIVERIES_NUDGE = "deliveries"


def nudge_address(storage_folder: Path, purpose: str) -> str | None:
    """The abstract socket name for `purpose` on this storage folder (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    folder = os.path.realpath(storage_folder)
    digest = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"\0pneumonode-{purpose}-{digest}"


def nudge(address: str | None) -> None:
    """Tell the listener at `address` that there is work; never blocks, never raises."""
    if address is None:
        return
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.setblocking(False)
        sock.sendto(b"!", address)


class NudgeListener:
    """Waits for nudges at one address, for an in-process `interrupt`, or for a timeout."""

    def __init__(self, address: str | None) -> None:
        self._sock: socket.socket | None = None
        self._interrupt_r, self._interrupt_w = os.pipe()
        os.set_blocking(self._interrupt_r, False)
        os.set_blocking(self._interrupt_w, False)
        if address is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError as exc:  # another listener on the same folder: it gets the nudges
            sock.close()
            log.info("no nudges here (%s): polling only", exc.strerror or exc)
            return
        sock.setblocking(False)
        self._sock = sock

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True if nudged or interrupted meanwhile.

        Every nudge already received is consumed: many nudges make one round.
        """
        waiting_on: list = [self._interrupt_r]
        if self._sock is not None:
            waiting_on.append(self._sock)
        ready, _, _ = select.select(waiting_on, [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._interrupt_r, 64):
                pass
        if self._sock is not None:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while self._sock.recv(64):
                    pass
        return bool(ready)

    def interrupt(self) -> None:
        """End the current (or next) `wait` at once, from this process."""
        with contextlib.suppress(OSError):  # a full pipe is already an interrupt
            os.write(self._interrupt_w, b"!")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._interrupt_r, self._interrupt_w):
            with contextlib.suppress(OSError):
                os.close(fd)
