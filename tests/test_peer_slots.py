"""Configured peers always find a slot, whatever unknown callers hold.

A crowd of unknown callers from two addresses (each within its per-address share) holds
associations open, or connects and stays silent; the PACS configured in `[[peers]]`,
calling from its own address, still gets in.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from node.testing.hostile import connect
from node.testing.node_process import NodeProcess, start_node, wait_for_log
from node.testing.ports import server_port

VERIFICATION = "1.2.840.10008.1.1"
CROWD = ("127.0.0.2", "127.0.0.3")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    # Defaults: 20 associations, 10 per address, 15 for callers not in [[peers]].
    peers = [{"ae_title": "PACS", "host": "127.0.0.1", "port": server_port()}]
    node = start_node(tmp_path / "node", {"peers": peers})
    try:
        yield node
    finally:
        node.stop()


def _associate(node: NodeProcess, title: str, source: str) -> Association:
    ae = AE(ae_title=title)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = 10
    return ae.associate(node.host, node.port, ae_title=node.ae_title, bind_address=(source, 0))


def _echo(node: NodeProcess, title: str, source: str = "127.0.0.1") -> bool:
    assoc = _associate(node, title, source)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == 0x0000


def test_a_peer_gets_in_beside_twenty_unknown_associations(node: NodeProcess) -> None:
    crowd = [_associate(node, "CROWD", source) for source in CROWD for _ in range(10)]
    try:
        held = [assoc for assoc in crowd if assoc.is_established]
        assert len(held) == 15  # node.max_unknown_associations
        assert all(assoc.send_c_echo().Status == 0 for assoc in held)  # kept alive
        assert _echo(node, "PACS")  # a peer, from its own host
        assert not _echo(node, "STRANGER")  # another unknown caller waits its turn
        wait_for_log(node, "callers not in [[peers]] hold node.max_unknown_associations")
    finally:
        for assoc in crowd:
            if assoc.is_established:
                assoc.release()


def test_silent_connections_take_no_association_slot(node: NodeProcess) -> None:
    silent: list[socket.socket] = []
    try:
        for source in CROWD:
            for _ in range(10):
                sock = connect(node.host, node.port, source)
                if sock is not None:
                    silent.append(sock)
        wait_for_log(node, "refused connection from 127.0.0.3: node.max_unknown_associations")
        assert _echo(node, "PACS")
        assert _echo(node, "STRANGER")  # from a peer's host: its connection is let in too
        # Unknown hosts wait while the silent ones fill their pool (until ARTIM drops
        # them); none took an association slot, so one that goes makes room at once.
        assert not _echo(node, "OTHER", "127.0.0.4")
        silent.pop(0).close()  # one the node let in (the last ones it closed itself)
        deadline = time.monotonic() + 5
        while not _echo(node, "OTHER", "127.0.0.4"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for sock in silent:
            sock.close()
