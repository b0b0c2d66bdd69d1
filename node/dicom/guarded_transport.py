"""pynetdicom's association server, hardened against senders that stall, flood or lie.

pynetdicom reads a PDU as one blocking `recv(6)` for its header and one `recv(length)` for
its body, with no deadline, and accepts any announced length: ten connections that announce
4 GB and send nothing hold every association slot forever. This module is where the node
adapts pynetdicom's transport, with two helpers of one job each:
`node.dicom.reactor_wakeups` (the reactors' naps) and `node.dicom.find_stream` (C-FIND
Pending responses written in batches). `tests/test_guarded_transport.py` and
`tests/test_find_stream.py` pin what they rely on:

- `GuardedAssociationSocket.recv` (over pynetdicom's `AssociationSocket.recv`) gives every
  PDU header and body a deadline, answers a PDU longer than the node accepts with A-ABORT
  before reading its body, and decides on the A-ASSOCIATE-RQ's calling AE title and the
  peer's address (A-ASSOCIATE-RJ) before pynetdicom negotiates;
- `GuardedServer` (a `ThreadedAssociationServer`) counts associations node-wide
  (`node.dicom.slots`, shared by every serve process), caps those one remote address may
  hold, leaves a new connection to a serve process that holds fewer, does the TLS
  handshake in the connection's own thread with a deadline, not in the accept loop where
  one silent client would stop every other, and shares one copy of the supported
  presentation contexts instead of pynetdicom's deep copy per association;
- `node.dicom.reactor_wakeups` wakes pynetdicom's two polling reactors when there is work;
- `node.dicom.peer_silence` keeps the idle timer (`node.network_timeout`) from counting the
  time the node spends serving a request;
- `node.dicom.store_stream` takes plain C-STORE requests off pynetdicom's DIMSE path.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.dicom.peer_silence import restart_after_each_request
from node.dicom.reactor_wakeups import close_wakeups, make_responsive
from node.dicom.slots import ADDRESS_FULL, ADMITTED, NODE_FULL, AssociationSlots, Ticket
from node.dicom.store_stream import stream_stores
from node.metrics.definitions import metrics

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
PDU_HEADER_LENGTH = 6
# An A-ASSOCIATE-RQ with 128 presentation contexts of 40 transfer syntaxes each is ~170 KB.
MAX_ASSOCIATE_RQ_LENGTH = 1 << 20
MAX_CONTROL_PDU_LENGTH = 1 << 10  # A-ASSOCIATE-RJ/AC aside, the others are 4 bytes long
UNLIMITED_PDU_LENGTH = 0xFFFFFFFF
# How long a busier serve process leaves a new connection to a less busy one, and how
# often it looks whether that one took it (GuardedServer.get_request).
ACCEPT_DEFERRAL_SECONDS = 0.05
ACCEPT_DEFERRAL_STEP_SECONDS = 0.0005

# A-ABORT: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8.
A_ABORT_INVALID_PARAMETER = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6))


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


# Rejected-permanent by the service user: calling AE title not recognised (PS3.8 9.3.4).
REJECT_CALLING_AE = a_associate_rj(1, 1, 3)

# Rejected-transient by the service provider (presentation): local limit exceeded.
REJECT_LOCAL_LIMIT = a_associate_rj(2, 3, 2)

# Decides on an association request: (calling AE title, called AE title, remote address)
# -> None to let pynetdicom negotiate, or the reason it is rejected (logged).
Admission = Callable[[str, str, str], str | None]


@dataclass(frozen=True)
class GuardLimits:
    """How long a sender may take and how much it may announce."""

    read_timeout: float  # seconds for any one PDU header or body (node.network_timeout)
    request_timeout: float  # seconds from connect to a whole A-ASSOCIATE-RQ (ARTIM)
    max_pdu_length: int  # the node's maximum PDU (0: unlimited)
    max_per_address: int  # associations one remote address may hold at once
    admission: Admission | None = None
    # Whether a calling AE title is a [[peers]] one (asked once admission let it in), and
    # whether an address is the host of one: they get the slots unknown callers cannot.
    is_peer: Callable[[str], bool] | None = None
    is_peer_host: Callable[[str], bool] | None = None


class PduRefused(ConnectionAbortedError):
    """The peer was answered (A-ABORT or A-ASSOCIATE-RJ) and the connection is dropped."""


class GuardedAssociationSocket(AssociationSocket):
    """An AssociationSocket whose reads have deadlines and whose PDUs have limits.

    pynetdicom treats an OSError from `recv` as the transport closing (Evt17): the
    association ends and its slot is free. Objects are converted to this class right after
    pynetdicom created them (`guard_socket`), so there is no constructor of our own.
    """

    _limits: GuardLimits
    _connected_at: float
    _expect_header: bool
    _pdu_type: int
    _first_pdu: bool
    _accepted_ids: frozenset[int] | None
    _slots: AssociationSlots | None
    _ticket: Ticket | None

    def recv(self, nr_bytes: int) -> bytearray:
        if self._expect_header:
            data = self._read(nr_bytes, self._deadline())
            self._check_header(data)
            return data
        self._expect_header = True
        deadline = self._deadline()
        data = self._read(nr_bytes, deadline)
        if self._first_pdu and self._pdu_type == A_ASSOCIATE_RQ and len(data) == nr_bytes:
            self._first_pdu = False
            self._admit(bytes(data))
        elif self._pdu_type == P_DATA_TF and len(data) == nr_bytes:
            self._check_contexts(data)
        return data

    def _check_contexts(self, body: bytearray) -> None:
        """Every PDV must name an accepted presentation context (PS3.8 9.3.5); pynetdicom
        would wait for the rest of a message that can never come."""
        if self._accepted_ids is None:  # fixed once negotiated; P-DATA comes after
            self._accepted_ids = frozenset(c.context_id for c in self.assoc.accepted_contexts)
        accepted = self._accepted_ids
        offset = 0
        while offset + 5 <= len(body):
            item_length, context_id = struct.unpack_from(">IB", body, offset)
            if context_id not in accepted:
                self._refuse(
                    A_ABORT_INVALID_PARAMETER,
                    f"P-DATA on presentation context {context_id}, which was not accepted",
                )
            offset += 4 + item_length

    def _deadline(self) -> float:
        if self._first_pdu:
            return self._connected_at + self._limits.request_timeout
        return time.monotonic() + self._limits.read_timeout

    def _read(self, nr_bytes: int, deadline: float) -> bytearray:
        """Like AssociationSocket.recv, but the whole read ends by `deadline`."""
        sock = self.socket
        if sock is None:
            return bytearray()
        data = bytearray()
        while len(data) < nr_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(self._stalled(len(data), nr_bytes))
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(min(nr_bytes - len(data), 1 << 16))
            except TimeoutError:
                raise TimeoutError(self._stalled(len(data), nr_bytes)) from None
            if not chunk:
                self._closed_by_peer()
                break  # closed by the peer: pynetdicom sees the short read
            data.extend(chunk)
        sock.settimeout(self._limits.read_timeout)  # sends must not block forever either
        return data

    def _closed_by_peer(self) -> None:
        """A connection closed before its A-ASSOCIATE-RQ gives its pending count back now;
        pynetdicom ends its association only after ARTIM."""
        if self._first_pdu and self._slots is not None and self._ticket is not None:
            self._slots.give_back(self._ticket)

    def _stalled(self, received: int, wanted: int) -> str:
        what = "association request" if self._first_pdu else "PDU"
        message = f"{what} stalled at {received} of {wanted} bytes"
        log.warning("aborted connection from %s: %s", self._peer(), message)
        return message

    def _peer(self) -> str:
        address = self.assoc.requestor.address_info
        return f"{address.address}:{address.port}"

    def _check_header(self, header: bytearray) -> None:
        if len(header) != PDU_HEADER_LENGTH:
            return  # the peer closed; pynetdicom handles the short read
        pdu_type, _, length = struct.unpack(">BBI", header)
        self._pdu_type = pdu_type
        if pdu_type not in KNOWN_PDU_TYPES:
            return  # pynetdicom aborts it and reads no body
        self._expect_header = False
        limit = self._length_limit(pdu_type)
        if length > limit:
            self._refuse(
                A_ABORT_INVALID_PARAMETER,
                f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds {limit}",
            )

    def _length_limit(self, pdu_type: int) -> int:
        if pdu_type == A_ASSOCIATE_RQ:
            return MAX_ASSOCIATE_RQ_LENGTH
        if pdu_type == P_DATA_TF:
            return self._limits.max_pdu_length or UNLIMITED_PDU_LENGTH
        return MAX_CONTROL_PDU_LENGTH

    def _admit(self, body: bytes) -> None:
        """Apply the admission rule to the A-ASSOCIATE-RQ (PS3.8 9.3.2: protocol version,
        reserved, called AE title, calling AE title, each title 16 bytes), then take an
        association slot for the connection: a [[peers]] caller may take any, an unknown
        one only those of node.max_unknown_associations."""
        called = body[4:20].decode("ascii", "replace").strip() if len(body) >= 36 else ""
        calling = body[20:36].decode("ascii", "replace").strip() if len(body) >= 36 else ""
        limits = self._limits
        if limits.admission is not None and len(body) >= 36:
            reason = limits.admission(calling, called, self.assoc.requestor.address_info.address)
            if reason is not None:
                metrics().associations_rejected.labels("calling_ae_title").inc()
                self._refuse(
                    REJECT_CALLING_AE,
                    f"association rejected: calling AE {calling!r}: {reason}",
                    level=logging.INFO,
                )
        if self._slots is None or self._ticket is None:
            return
        peer = limits.is_peer is not None and limits.is_peer(calling)
        outcome = self._slots.associate(self._ticket, peer)
        if outcome == NODE_FULL:
            metrics().associations_rejected.labels("max_associations").inc()
            self._refuse(
                REJECT_LOCAL_LIMIT,
                "association rejected: the node holds node.max_associations associations, "
                f"calling AE {calling!r}",
            )
        if outcome != ADMITTED:
            metrics().associations_rejected.labels("max_unknown_associations").inc()
            self._refuse(
                REJECT_LOCAL_LIMIT,
                "association rejected: callers not in [[peers]] hold "
                f"node.max_unknown_associations associations, calling AE {calling!r}",
            )

    def _refuse(self, answer: bytes, message: str, level: int = logging.WARNING) -> None:
        log.log(level, "%s from %s", message, self._peer())
        with contextlib.suppress(OSError):
            self.socket.sendall(answer)
        raise PduRefused(message)


def guard_socket(assoc_socket: AssociationSocket, limits: GuardLimits) -> None:
    """Turn pynetdicom's freshly made acceptor socket into a GuardedAssociationSocket."""
    assoc_socket.__class__ = GuardedAssociationSocket
    guarded = assoc_socket
    guarded._limits = limits
    guarded._connected_at = time.monotonic()
    guarded._expect_header = True
    guarded._pdu_type = 0
    guarded._first_pdu = True
    guarded._accepted_ids = None
    guarded._slots = None
    guarded._ticket = None
    if guarded.socket is not None:
        guarded.socket.settimeout(limits.read_timeout)
        # Streams of small responses (C-FIND Pendings) must not wait for delayed ACKs.
        with contextlib.suppress(OSError):
            guarded.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the TLS handshake done here, the socket guarded, the
    reactors woken by work, and the connection's thread alive until its association ends
    (so the node-wide slot it holds is given back exactly then)."""

    server: GuardedServer

    def setup(self) -> None:
        context = self.server.tls_context
        if context is None:
            return
        raw: socket.socket = self.request
        raw.settimeout(self.server.limits.request_timeout)
        try:
            tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "TLS handshake with %s:%s failed: %s",
                *self.client_address[:2],
                getattr(exc, "reason", None) or exc,
            )
            raw.close()
            raise _HandshakeFailed from None
        self.request = tls

    def handle(self) -> None:
        super().handle()
        assoc = self._assoc
        try:
            assoc.join()
        finally:
            close_wakeups(assoc)

    def _create_association(self):  # noqa: ANN202 - pynetdicom's own return type
        assoc = super()._create_association()
        guard_socket(assoc.dul.socket, self.server.limits)
        assoc.dul.socket._slots = self.server.slots
        # By address and port: after a TLS handshake `self.request` is another object.
        assoc.dul.socket._ticket = self.server.ticket(self.client_address)
        make_responsive(assoc)
        restart_after_each_request(assoc)
        stream_stores(assoc)
        self._assoc = assoc
        return assoc


class _HandshakeFailed(Exception):
    """Already logged; the connection is closed."""


class SharedContexts(list):
    """The supported presentation contexts, shared by every association of a server.

    pynetdicom deep-copies the server's contexts for each association (187 SOP classes x
    34 transfer syntaxes: ~25 ms, most of an echo's time). Acceptor negotiation only reads
    them (`negotiate_as_acceptor` builds new result contexts), so one copy serves all.
    """

    def __deepcopy__(self, memo: dict) -> SharedContexts:
        return self


class GuardedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer with node-wide association slots and TLS outside the
    accept loop, serving on its own socket or on one a supervising process listens on.

    Made with `ae.make_server(..., server_class=GuardedServer, request_handler=
    GuardedRequestHandler, limits=..., slots=..., tls_context=..., listening_socket=...)`;
    pynetdicom's own `ssl_context` stays None, since it would shake hands in the thread
    that accepts every connection.
    """

    request_queue_size = 128  # socketserver's 5 drops bursts of parallel senders

    def __init__(
        self,
        *args,
        limits: GuardLimits,
        slots: AssociationSlots | None = None,
        tls_context: ssl.SSLContext | None = None,
        listening_socket: socket.socket | None = None,
        **kwargs,
    ) -> None:
        self.limits = limits
        self.tls_context = tls_context
        self._listening_socket = listening_socket
        self._tickets: dict[tuple, Ticket] = {}  # by the connection's (address, port)
        self._tickets_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        # One process alone: slots for this server's AE only.
        self.slots = slots or AssociationSlots(
            self.ae.maximum_associations, limits.max_per_address, 1
        )
        self.contexts = SharedContexts(self.contexts)

    def service_actions(self) -> None:
        """Nothing: pynetdicom's own runs a full `gc.collect()` every 60 connections, which
        stalls every association of the process for tens of milliseconds (more once torch
        is imported). Finished associations are reference cycles that Python's automatic
        collector frees anyway; `tests/test_guarded_transport.py` pins that they are."""

    def server_bind(self) -> None:
        if self._listening_socket is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self._listening_socket
        # Every serve process wakes for a new connection and one wins it: the others must
        # get EAGAIN from accept, not block in it (and miss a shutdown).
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listening_socket is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection, after leaving it for a moment to a less busy serve process.

        Every serve process wakes for a new connection. One that holds more connections
        than another accepting process waits up to ACCEPT_DEFERRAL_SECONDS for that one
        to take it (then accept raises BlockingIOError and socketserver moves on); if the
        other is too slow, this one accepts after all, so nothing waits long."""
        deadline = time.monotonic() + ACCEPT_DEFERRAL_SECONDS
        while self.slots.another_accepts_with_fewer() and time.monotonic() < deadline:
            time.sleep(ACCEPT_DEFERRAL_STEP_SECONDS)
            if not select.select([self.socket], [], [], 0)[0]:
                raise BlockingIOError("taken by another serve process")
        return super().get_request()

    def verify_request(self, request, client_address) -> bool:
        """Count the connection as pending (node.dicom.slots), or refuse it at once.

        Runs in the accept loop. An address that holds its share is refused, and so is an
        address that is no peer's host while node.max_unknown_associations connections
        from such addresses wait for their A-ASSOCIATE-RQ. The association slot is taken
        when the A-ASSOCIATE-RQ names the caller (GuardedAssociationSocket._admit).
        """
        address = str(client_address[0])
        peer_host = self.limits.is_peer_host is not None and self.limits.is_peer_host(address)
        verdict, ticket = self.slots.connect(address, peer_host)
        if verdict.outcome == ADDRESS_FULL:
            metrics().associations_rejected.labels("max_associations_per_address").inc()
            log.warning(
                "refused connection from %s: it holds %d connections "
                "(node.max_associations_per_address)",
                address,
                verdict.held_by_address,
            )
            return False
        if verdict.outcome != ADMITTED:
            metrics().associations_rejected.labels("unknown_hosts_waiting").inc()
            log.warning(
                "refused connection from %s: node.max_unknown_associations connections from "
                "unknown hosts wait for their association request",
                address,
            )
            return False
        with self._tickets_lock:
            self._tickets[tuple(client_address[:2])] = ticket
        return True

    def ticket(self, client_address) -> Ticket | None:
        with self._tickets_lock:
            return self._tickets.get(tuple(client_address[:2]))

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._tickets_lock:
                ticket = self._tickets.pop(tuple(client_address[:2]), None)
            if ticket is not None:
                self.slots.give_back(ticket)

    def handle_error(self, request, client_address) -> None:
        """One log line instead of socketserver's traceback on stderr."""
        error = sys.exc_info()[1]
        if isinstance(error, _HandshakeFailed):
            return
        log.error("connection from %s failed: %s", client_address[0], error)

    def shutdown(self) -> None:
        if self not in self.ae._servers:  # made with make_server, not start_server
            self.ae._servers.append(self)
        super().shutdown()
