"""Connections that misbehave on purpose, from a loopback address of their own (127.0.0.2),
for the hostile-network tests and `bench/hostile`. Each kind is held open until closed."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

HOSTILE_ADDRESS = "127.0.0.2"
HUGE_ASSOCIATE_RQ = struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF)  # announces 4 GB, sends nothing


def connect(host: str, port: int, source: str = HOSTILE_ADDRESS) -> socket.socket | None:
    """A TCP connection from `source`, or None if the server refused or closed it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.bind((source, 0))
        sock.connect((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def huge_length(sock: socket.socket) -> None:
    sock.sendall(HUGE_ASSOCIATE_RQ)


def silent(_sock: socket.socket) -> None:
    """Connects and sends nothing."""


def one_byte(sock: socket.socket) -> None:
    sock.sendall(b"\x01")


KINDS: dict[str, Callable[[socket.socket], None]] = {
    "huge-length": huge_length,
    "one-byte-then-drip": one_byte,
    "silent": silent,
}


class Dripper:
    """Sends one more byte of an A-ASSOCIATE-RQ header every `interval` seconds on each
    'drip' connection, as a slowloris would, until stopped."""

    def __init__(self, sockets: list[socket.socket], interval: float = 1.0) -> None:
        self.sockets = sockets
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for sock in list(self.sockets):
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    self.sockets.remove(sock)

    def __enter__(self) -> Dripper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def hostile_connections(host: str, port: int, per_kind: int) -> Iterator[dict[str, int]]:
    """`per_kind` connections of each kind held open; yields how many of each connected."""
    opened: dict[str, list[socket.socket]] = {kind: [] for kind in KINDS}
    try:
        for kind, start in KINDS.items():
            for _ in range(per_kind):
                sock = connect(host, port)
                if sock is None:
                    continue
                with contextlib.suppress(OSError):
                    start(sock)
                opened[kind].append(sock)
        with Dripper(list(opened["one-byte-then-drip"])):
            time.sleep(0.2)  # let the server take them all in
            yield {kind: len(socks) for kind, socks in opened.items()}
    finally:
        for socks in opened.values():
            for sock in socks:
                sock.close()


def answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends back within `timeout` (b"" once it closed)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(64)
    except TimeoutError:
        return b"(no answer)"
    except OSError:
        return b""
