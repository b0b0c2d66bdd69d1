"""What node/dicom/guarded_transport.py relies on in pynetdicom, pinned: if an upgrade changes
how pynetdicom reads PDUs or builds acceptor sockets, these fail before the node does."""

from __future__ import annotations

import copy
import inspect
import queue
import socket
import ssl
import struct
import time
from types import SimpleNamespace

import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.timer import Timer
from pynetdicom.transport import (
    AddressInformation,
    AssociationServer,
    AssociationSocket,
    RequestHandler,
)

from node.config import load_config
from node.dicom.guarded_transport import (
    A_ABORT_INVALID_PARAMETER,
    GuardedAssociationSocket,
    GuardedRequestHandler,
    GuardedServer,
    GuardLimits,
    PduRefused,
    SharedContexts,
    guard_socket,
)
from node.dicom.peer_silence import no_idle_timeout_as_requestor, restart_after_each_request
from node.dicom.reactor_wakeups import (
    ASSOCIATION_REACTOR_NAP,
    install,
    keep_responses_for_the_sender,
    wake_on_put,
)
from node.dicom.slots import ADDRESS_FULL, ADMITTED, PENDING_FULL, UNKNOWN_FULL, AssociationSlots
from node.process.server import build_ae

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


# --- what node/dicom/reactor_wakeups.py and the shared contexts rely on ------------------


def test_pynetdicom_reactors_nap_where_the_wakeups_take_over() -> None:
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(DULServiceProvider.run_reactor)
    assert f"time.sleep({ASSOCIATION_REACTOR_NAP})" in inspect.getsource(Association._run_reactor)
    assert "self.dimse.get_msg(block=False)" in inspect.getsource(Association._run_reactor)
    assert "self.msg_queue.put(" in inspect.getsource(DIMSEServiceProvider.receive_primitive)
    assert "self.to_provider_queue.queue[0]" in inspect.getsource(
        DULServiceProvider._process_recv_primitive
    )
    # The DUL takes an event it queued itself before it naps (so it need not wake itself).
    dul_loop = inspect.getsource(DULServiceProvider.run_reactor)
    assert "event = self.event_queue.get(block=False)" in dul_loop
    assert dul_loop.index("self.state_machine.do_action(event)") < dul_loop.rindex("sleep = False")


def test_the_wakeups_install_once_and_leave_other_sleeps_alone() -> None:
    install()
    install()
    assert pynetdicom.dul.time.sleep is not time.sleep  # the clock stands in
    assert pynetdicom.dul.time.monotonic is time.monotonic  # everything else is time's
    start = time.monotonic()
    pynetdicom.association.time.sleep(0.02)  # not a reactor thread: a real sleep
    assert time.monotonic() - start >= 0.02


def test_only_what_others_queue_wakes_the_dul() -> None:
    import threading

    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    try:
        events: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: events.put("its own event"))
        wake_on_put(events, wake_write, reader=reader)
        reader.start()
        reader.join()
        with pytest.raises(BlockingIOError):
            wake_read.recv(16)  # the DUL queueing for itself is awake already
        events.put("from another thread")
        assert wake_read.recv(16) == b"\0"
        assert [events.get_nowait(), events.get_nowait()] == [
            "its own event",
            "from another thread",
        ]
    finally:
        wake_read.close()
        wake_write.close()


def test_a_queued_primitive_wakes_the_dul() -> None:
    wake_read, wake_write = socket.socketpair()
    try:
        to_do: queue.Queue = queue.Queue()
        wake_on_put(to_do, wake_write)
        to_do.put("primitive")
        assert wake_read.recv(16) == b"\0"
        assert to_do.get_nowait() == "primitive"
    finally:
        wake_read.close()
        wake_write.close()


def test_pynetdicom_copies_the_server_contexts_for_each_association() -> None:
    assert "deepcopy(self.server.contexts)" in inspect.getsource(RequestHandler._create_association)
    shared = SharedContexts([object()])
    assert copy.deepcopy(shared) is shared


def test_acceptor_negotiation_leaves_the_supported_contexts_untouched() -> None:
    ae = build_ae(load_config(None))
    supported = ae.supported_contexts
    before = [(str(c), c.scu_role, c.scp_role) for c in supported]
    requested = []
    for number, context in enumerate(supported[:40]):
        proposal = PresentationContext()
        proposal.context_id = 2 * number + 1
        proposal.abstract_syntax = context.abstract_syntax
        proposal.transfer_syntax = [context.transfer_syntax[-1], "1.2.840.10008.1.2"]
        requested.append(proposal)
    roles = {requested[0].abstract_syntax: (True, True)}
    accepted, _ = negotiate_as_acceptor(requested, supported, roles)
    assert all(context.result == 0 for context in accepted)
    assert [(str(c), c.scu_role, c.scp_role) for c in supported] == before


# --- node-wide association slots ----------------------------------------------------------


def test_slots_count_for_the_whole_node_across_process_rows() -> None:
    slots = AssociationSlots(total=3, per_address=2, processes=2, unknown=2)
    first, second = slots.for_process(0), slots.for_process(1)

    def associate(row: AssociationSlots, address: str, peer: bool = False):
        verdict, ticket = row.connect(address, peer_address=peer)
        if verdict.outcome == ADMITTED:
            assert row.associate(ticket, peer) == ADMITTED or not peer
        return verdict, ticket

    a, ticket_a = associate(first, "10.0.0.1")
    b, _ = associate(second, "10.0.0.1")
    assert a.outcome == b.outcome == ADMITTED
    verdict, _ = first.connect("10.0.0.1")
    assert verdict.outcome == ADDRESS_FULL and verdict.held_by_address == 2
    # Unknown callers hold their 2 of 3: the third slot is a peer's.
    verdict, ticket = second.connect("10.0.0.2")
    assert verdict.outcome == ADMITTED
    assert second.associate(ticket, peer=False) == UNKNOWN_FULL
    _, peer_ticket = associate(second, "10.0.0.9", peer=True)
    assert slots.held() == 3
    first.give_back(ticket_a)
    assert slots.held() == 2
    second.clear_row(1)  # process 2 died: its slots are free
    assert slots.held() == 0


def test_a_busier_process_leaves_a_new_connection_to_an_accepting_one_with_fewer() -> None:
    slots = AssociationSlots(total=8, per_address=8, processes=3)
    first, second, third = (slots.for_process(row) for row in range(3))
    assert not AssociationSlots(8, 8, 1).another_accepts_with_fewer()  # one process
    first.connect("10.0.0.1")
    assert not first.another_accepts_with_fewer()  # nobody else accepts yet
    third.set_accepting(True)
    assert first.another_accepts_with_fewer()  # 1 connection against 0
    assert not third.another_accepts_with_fewer()
    assert not second.another_accepts_with_fewer()  # holds none: never leaves one
    _, ticket = third.connect("10.0.0.2")
    assert not first.another_accepts_with_fewer()  # 1 against 1: whoever wakes first
    third.give_back(ticket)
    third.set_accepting(False)  # stopping: no longer a place for connections
    assert not first.another_accepts_with_fewer()
    third.set_accepting(True)
    slots.clear_row(2)  # died: its row, accepting mark included, is cleared
    assert not first.another_accepts_with_fewer()


def test_waiting_connections_take_no_association_slot() -> None:
    slots = AssociationSlots(total=4, per_address=3, processes=1, unknown=2)
    waiting = [slots.connect(address)[0].outcome for address in ("10.0.0.1", "10.0.0.2")]
    assert waiting == [ADMITTED, ADMITTED]
    verdict, _ = slots.connect("10.0.0.3")
    assert verdict.outcome == PENDING_FULL  # unknown hosts: 2 may wait at once
    verdict, ticket = slots.connect("10.0.0.9", peer_address=True)  # a peer's host
    assert verdict.outcome == ADMITTED
    assert slots.associate(ticket, peer=True) == ADMITTED
    assert slots.held() == 1
    slots.give_back(ticket)
    slots.give_back(ticket)  # twice is harmless
    assert slots.held() == 0


def _verification_server(timeout: float, **server_args) -> GuardedServer:
    """A GuardedServer of Verification on a free loopback port, serving in a thread."""
    import threading

    from pynetdicom.sop_class import Verification

    ae = AE()
    ae.add_supported_context(Verification)
    limits = GuardLimits(
        read_timeout=timeout, request_timeout=timeout, max_pdu_length=1 << 20, max_per_address=4
    )
    server = ae.make_server(
        ("127.0.0.1", 0),
        server_class=GuardedServer,
        request_handler=GuardedRequestHandler,
        limits=limits,
        **server_args,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _tls_contexts(folder) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts with certificates of a throw-away PKI."""
    from tls_support import make_pki

    pki = make_pki(folder)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(pki.node.certificate), str(pki.node.key))
    return server, ssl.create_default_context(cafile=str(pki.ca))


def test_nothing_of_the_server_keeps_a_finished_association_alive() -> None:
    """GuardedServer drops pynetdicom's `gc.collect()` every 60 connections (a pause of
    every association in the process), leaving finished associations (reference cycles) to
    Python's automatic collector: which frees them only if nothing of the server (handler,
    slots, wake-ups, the server's own lists) still refers to them. One collection here
    stands for the automatic ones."""
    import gc
    import weakref

    from pynetdicom import evt
    from pynetdicom.sop_class import Verification

    served: list[weakref.ref] = []
    server = _verification_server(
        5,
        evt_handlers=[(evt.EVT_ESTABLISHED, lambda event: served.append(weakref.ref(event.assoc)))],
    )
    try:
        scu = AE()
        scu.add_requested_context(Verification)
        for _ in range(70):
            assoc = scu.associate("127.0.0.1", server.server_address[1])
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        deadline = time.monotonic() + 10
        while server.active_associations:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        server.shutdown()
    assert len(served) == 70
    gc.collect()
    assert sum(ref() is not None for ref in served) == 0


@pytest.mark.parametrize("over_tls", [False, True], ids=["plain", "tls"])
def test_woken_acceptors_need_no_nap_to_serve_release_or_abort(
    monkeypatch, tmp_path, over_tls
) -> None:
    """With naps of a minute, every request, release and abort must still be served at
    once, and every association's threads end: each of these reaches its reactor through
    a wake-up (node.dicom.reactor_wakeups), none through a nap's end. Over TLS, the bytes
    TLS has already decrypted are seen too (select cannot see them)."""
    from pynetdicom.sop_class import Verification

    from node.dicom import reactor_wakeups

    monkeypatch.setattr(reactor_wakeups, "WOKEN_NAP_SECONDS", 60.0)
    server_tls, client_tls = _tls_contexts(tmp_path) if over_tls else (None, None)
    server = _verification_server(30, tls_context=server_tls)
    scu = AE()
    scu.acse_timeout = scu.dimse_timeout = 10
    scu.add_requested_context(Verification)
    tls_args = (client_tls, "localhost") if client_tls is not None else None
    try:
        for number in range(6):
            assoc = scu.associate("127.0.0.1", server.server_address[1], tls_args=tls_args)
            assert assoc.is_established
            assert [assoc.send_c_echo().Status for _ in range(3)] == [0, 0, 0]
            if number % 2:
                assoc.abort()
                assert assoc.is_aborted
            else:
                assoc.release()
                assert assoc.is_released
        deadline = time.monotonic() + 15
        while server.active_associations:
            assert time.monotonic() < deadline, "an association outlived its release or abort"
            time.sleep(0.01)
    finally:
        server.shutdown()


def test_a_dul_does_not_nap_while_tls_holds_decrypted_bytes(monkeypatch, tmp_path) -> None:
    """Bytes TLS has decrypted but the DUL has not read are invisible to select: the DUL
    must not nap on the socket then (here a nap would last a minute)."""
    import threading

    from node.dicom import reactor_wakeups

    monkeypatch.setattr(reactor_wakeups, "WOKEN_NAP_SECONDS", 60.0)
    server_tls, client_tls = _tls_contexts(tmp_path)
    ours, theirs = socket.socketpair()
    shaken: list[ssl.SSLSocket] = []
    handshake = threading.Thread(
        target=lambda: shaken.append(server_tls.wrap_socket(ours, server_side=True))
    )
    handshake.start()
    client = client_tls.wrap_socket(theirs, server_hostname="localhost")
    handshake.join(10)
    server_side = shaken[0]
    try:
        client.sendall(b"abcdef")
        assert server_side.recv(2) == b"ab"
        assert server_side.pending() == 4  # decrypted, waiting in TLS, not in the kernel
        assoc = Association(AE(), "acceptor")
        reactor_wakeups.wake_dul_on_work(assoc)
        assoc.dul.socket = SimpleNamespace(socket=server_side)
        napped = threading.Event()
        threading.Thread(
            target=lambda: (assoc.dul._pneumonode_waker(0.001), napped.set()), daemon=True
        ).start()
        assert napped.wait(10), "the DUL napped over bytes waiting in TLS"
        assoc.dul._pneumonode_close_wakeups()
    finally:
        client.close()
        server_side.close()


def test_a_stopped_dul_wakes_from_its_nap(monkeypatch) -> None:
    """kill_dul and stop_dul (which pynetdicom calls to end an association) wake a DUL
    reactor that naps on its wake-up socket."""
    import threading

    from node.dicom import reactor_wakeups

    monkeypatch.setattr(reactor_wakeups, "WOKEN_NAP_SECONDS", 60.0)
    for stop in ("kill_dul", "stop_dul"):
        assoc = Association(AE(), "acceptor")
        reactor_wakeups.wake_dul_on_work(assoc)
        dul = assoc.dul
        dul.state_machine.current_state = "Sta1"
        napped = threading.Event()

        def nap(dul=dul, napped=napped) -> None:
            dul._pneumonode_waker(0.001)
            napped.set()

        thread = threading.Thread(target=nap, daemon=True)
        thread.start()
        time.sleep(0.05)  # let it reach its select
        if stop == "kill_dul":
            dul.kill_dul()
        else:
            dul.stop_dul()  # waits only while the DUL thread (never started here) lives
        assert napped.wait(10), f"{stop} did not wake the DUL"
        assert dul._kill_thread
        dul._pneumonode_close_wakeups()


def test_pynetdicom_pauses_its_reactor_around_a_send_as_the_guard_expects() -> None:
    """The gap `keep_responses_for_the_sender` closes: the reactor reads its queue without
    blocking once past the checkpoint; a send clears the checkpoint, then reads blocking."""
    reactor = inspect.getsource(Association._run_reactor)
    assert reactor.index("self._reactor_checkpoint.wait()") < reactor.index(
        "self.dimse.get_msg(block=False)"
    )
    send = inspect.getsource(Association.send_c_store)
    assert send.index("self._reactor_checkpoint.clear()") < send.index(
        "self.dimse.get_msg(block=True)"
    )


def test_a_paused_reactor_leaves_the_response_to_the_sender() -> None:
    assoc = Association(AE(), "requestor")
    keep_responses_for_the_sender(assoc)
    response = (1, object())
    assoc.dimse.msg_queue.put(response)
    assoc._reactor_checkpoint.clear()  # what send_c_store does before sending
    assert assoc.dimse.get_msg(block=False) == (None, None)
    assert assoc.dimse.get_msg(block=True) == response
    assoc._reactor_checkpoint.set()
    assoc.dimse.msg_queue.put(response)
    assert assoc.dimse.get_msg(block=False) == response  # unpaused: the reactor serves it


@pytest.mark.parametrize("nap", [None, 60.0], ids=["default-nap", "minute-nap"])
def test_woken_requestor_gets_every_response_from_a_fast_peer(tmp_path, monkeypatch, nap) -> None:
    """Hundreds of C-STOREs to dcmtk's storescp (which answers within microseconds) over
    one woken requestor association: no response is lost to the reactor, which would
    leave that send to its DIMSE timeout and an empty status. With naps of a minute, the
    sends and the release still go at once: they wake the DUL."""
    from pydicom.uid import ExplicitVRLittleEndian

    from node.dicom import reactor_wakeups

    if nap is not None:
        monkeypatch.setattr(reactor_wakeups, "WOKEN_NAP_SECONDS", nap)

    from node.dicom.send_instances import send_without_delay
    from node.testing.dcmtk import StoreSCP
    from node.testing.samples import small_image

    scp = StoreSCP(tmp_path / "received")
    scp.start()
    try:
        ae = AE(ae_title="PNEUMONODE")
        ae.dimse_timeout = 5
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
        assert assoc.is_established
        send_without_delay(assoc)
        assert hasattr(assoc.dul, "_pneumonode_waker")
        images = [small_image(rows=8, columns=8) for _ in range(300)]
        statuses = []
        for image in images:
            image.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            statuses.append(assoc.send_c_store(image).get("Status"))
        assoc.release()
    finally:
        scp.stop()
    assert statuses == [0] * len(images)
    assert len(scp.received_uids()) == len(images)


# --- the idle timer (node.dicom.peer_silence) ---------------------------------------------


def test_the_idle_timer_restarts_once_a_request_is_served() -> None:
    """A request served for longer than network_timeout (a long C-FIND before its first
    match) leaves a fresh timer: the node waits for the peer only from then on."""
    timer = Timer(0.05)
    timer.start()
    assoc = SimpleNamespace(
        dul=SimpleNamespace(_idle_timer=timer), _serve_request=lambda msg, cx: time.sleep(0.1)
    )
    restart_after_each_request(assoc)
    assoc._serve_request(None, 1)
    assert not timer.expired
    time.sleep(0.06)
    assert timer.expired  # the peer's silence still counts


def test_the_node_s_requestor_associations_have_no_idle_timeout() -> None:
    timer = Timer(0.01)
    timer.start()
    no_idle_timeout_as_requestor(SimpleNamespace(dul=SimpleNamespace(_idle_timer=timer)))
    time.sleep(0.02)
    assert not timer.expired
