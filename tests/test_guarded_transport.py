"""What node/dicom/guarded_transport.py relies on in pynetdicom, pinned: if an upgrade changes
how pynetdicom reads PDUs or builds acceptor sockets, these fail before the node does."""

from __future__ import annotations

import inspect
import socket
import struct
import time

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import (
    AddressInformation,
    AssociationServer,
    AssociationSocket,
    RequestHandler,
)

from node.dicom.guarded_transport import (
    A_ABORT_INVALID_PARAMETER,
    GuardedAssociationSocket,
    GuardLimits,
    PduRefused,
    guard_socket,
)

LIMITS = GuardLimits(read_timeout=0.3, request_timeout=0.3, max_pdu_length=1024, max_per_address=2)


def test_pynetdicom_reads_a_pdu_as_header_then_body() -> None:
    source = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in source
    assert "self.socket.recv(pdu_length)" in source
    assert "except (OSError, TimeoutError)" in source  # our refusals end the association


def test_pynetdicom_builds_acceptor_sockets_where_we_guard_them() -> None:
    source = inspect.getsource(RequestHandler._create_association)
    assert "AssociationSocket(assoc, client_socket=self.request)" in source
    assert "request_handler" in inspect.signature(AssociationServer.__init__).parameters
    assert list(inspect.signature(AssociationSocket.recv).parameters) == ["self", "nr_bytes"]


@pytest.fixture
def guarded() -> tuple[GuardedAssociationSocket, socket.socket]:
    ours, theirs = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    assoc.requestor.address_info = AddressInformation("127.0.0.1", 1)
    assoc_socket = AssociationSocket(assoc, client_socket=ours)
    guard_socket(assoc_socket, LIMITS)
    assert isinstance(assoc_socket, GuardedAssociationSocket)
    yield assoc_socket, theirs
    theirs.close()
    ours.close()


def test_a_pdu_longer_than_allowed_gets_an_a_abort(guarded) -> None:
    assoc_socket, theirs = guarded
    theirs.sendall(struct.pack(">BBI", 0x01, 0, 2 << 20))
    with pytest.raises(PduRefused):
        assoc_socket.recv(6)
    assert theirs.recv(64) == A_ABORT_INVALID_PARAMETER


def test_a_stalled_header_times_out(guarded) -> None:
    assoc_socket, theirs = guarded
    theirs.sendall(b"\x01\x00")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="stalled at 2 of 6 bytes"):
        assoc_socket.recv(6)
    assert time.monotonic() - start < 1


def test_a_whole_pdu_passes(guarded) -> None:
    assoc_socket, theirs = guarded
    theirs.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0")  # A-RELEASE-RQ
    assert assoc_socket.recv(6) == struct.pack(">BBI", 0x05, 0, 4)
    assert assoc_socket.recv(4) == b"\0\0\0\0"
