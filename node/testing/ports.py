"""Ports for servers that a test or a benchmark starts beside a node.

A port chosen by one process and bound later by another can be taken in between, most
often as the ephemeral port of some outgoing connection. So the node binds port 0 and its
drivers read the port it logs; servers that cannot bind port 0 themselves (storescp,
Orthanc) get a port outside the kernel's ephemeral range (`server_port`), which no
outgoing connection is given, and their starts retry on a new port when they lose it.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Starts of a server on a port it cannot choose itself, before the test gives up.
SERVER_START_TRIES = 5
# A server restarted on the port its peers know (a destination coming back) tries that
# port this often, a second apart.
SAME_PORT_TRIES = 5


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (and to binds of port 0)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


SERVER_PORT_FLOOR = 10000
_random = random.SystemRandom()  # independent of any seeding a test does
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    """Nothing holds `port` on any address (servers such as storescp bind them all)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


# The node's documented ports (DICOM, DICOM TLS), which tests/test_readme.py uses as written.
NODE_DEFAULT_PORTS = frozenset({11112, 2762})


def server_port() -> int:
    """A port for a server that cannot bind port 0 itself: free now, and outside the
    ephemeral range, so no outgoing connection can take it before the server binds it.
    Only another server can, and the starters below then retry on a new port. Never the
    same port twice in this test process, so a port handed out for a server that is not
    running yet (or on purpose for nobody) stays its own."""
    low, high = ephemeral_port_range()
    # Above the ports services and these tests name (104, 4242, 5432, 8042...) where the
    # range leaves room for it.
    floor = SERVER_PORT_FLOOR if low - SERVER_PORT_FLOOR >= 1000 else 1025
    ranges = [r for r in (range(floor, low), range(high + 1, 65536)) if len(r)]
    if not ranges:  # the ephemeral range covers every port: a free one is all there is
        ranges = [range(1025, 65536)]
    total = sum(len(r) for r in ranges)
    for _ in range(1000):
        index = _random.randrange(total)
        for candidates in ranges:
            if index < len(candidates):
                port = candidates[index]
                break
            index -= len(candidates)
        if port not in _handed_out and port not in NODE_DEFAULT_PORTS and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port outside the ephemeral range {low}-{high}")


def free_port() -> int:
    """The benchmarks' name for `server_port` (bench/ scripts give it to the servers they
    start); the tests let servers bind port 0 or call `server_port` themselves."""
    return server_port()


class ServerDidNotStart(RuntimeError):
    """A server process exited or did not answer on the port it was given."""


def start_on_server_port(
    start: Callable[[int], T], what: str, tries: int = SERVER_START_TRIES
) -> T:
    """`start(port)` on a fresh `server_port()` until one start succeeds: another process
    may take a port between the check and the server's bind, so one lost race is not a
    failure. `start` raises ServerDidNotStart (having stopped its process) when it lost."""
    failures: list[str] = []
    for _ in range(tries):
        try:
            return start(server_port())
        except ServerDidNotStart as exc:
            failures.append(str(exc))
    raise RuntimeError(f"{what} did not start in {tries} tries:\n" + "\n".join(failures))
