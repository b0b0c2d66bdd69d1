"""node/dicom/store_stream.py: plain C-STOREs served from their PDUs in the DUL thread, and
everything else left to pynetdicom as before. A GuardedServer in this process, with a
C-STORE handler that records what it got (and in which thread), and pynetdicom or
hand-made PDUs (tests/raw_pdus.py) on the other side."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from dicom_data import encode_body
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from raw_pdus import c_store_command, pdata_tf, send_pdus

from node.dicom.guarded_transport import GuardedRequestHandler, GuardedServer, GuardLimits
from node.dicom.store_stream import (
    parse_command_set,
    split_pdvs,
    store_request,
)
from node.metrics.definitions import metrics
from node.metrics.dimse import DimseMetrics
from node.testing.samples import small_image

DX = DigitalXRayImageStorageForPresentation
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass
class Received:
    """What the C-STORE handler saw: the data set bytes, and whether it ran in the DUL."""

    data: bytes
    sop_instance: str
    in_dul_thread: bool


@dataclass
class Scp:
    port: int
    received: list[Received] = field(default_factory=list)
    answer: object = 0x0000
    delay: float = 0.0


@pytest.fixture(autouse=True)
def _as_the_node_runs(monkeypatch) -> None:
    """pynetdicom's logging handlers off (node.process.logs.quiet_pynetdicom): bound, they
    would watch every PDU and message, and this path leaves those to pynetdicom."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


def _handler(scp: Scp):
    def handle(event: evt.Event):
        scp.received.append(
            Received(
                bytes(event.request.DataSet.getvalue()),
                str(event.request.AffectedSOPInstanceUID),
                threading.current_thread() is event.assoc.dul,
            )
        )
        time.sleep(scp.delay)
        if isinstance(scp.answer, Exception):
            raise scp.answer
        return scp.answer

    return handle


@contextmanager
def storage_scp(
    max_pdu: int = 1 << 20, timeout: float = 5, extra_handlers: list | None = None
) -> Iterator[Scp]:
    ae = AE()
    ae.maximum_pdu_size = max_pdu
    ae.network_timeout = timeout  # the idle timer (node.network_timeout)
    ae.add_supported_context(DX, SYNTAXES)
    ae.add_supported_context(Verification)
    scp = Scp(0)
    limits = GuardLimits(
        read_timeout=timeout, request_timeout=timeout, max_pdu_length=max_pdu, max_per_address=4
    )
    server = ae.make_server(
        ("127.0.0.1", 0),
        evt_handlers=[
            (evt.EVT_C_STORE, _handler(scp)),
            *DimseMetrics().handlers(),
            *(extra_handlers or []),
        ],
        server_class=GuardedServer,
        request_handler=GuardedRequestHandler,
        limits=limits,
    )
    scp.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield scp
    finally:
        server.shutdown()


@contextmanager
def scu_association(scp: Scp, max_pdu: int = 0) -> Iterator:
    ae = AE()
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(DX, SYNTAXES)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _image() -> Dataset:
    ds = small_image(rows=256, columns=256)
    ds.SOPClassUID = DX
    return ds


# --- the pieces ---------------------------------------------------------------------------


def test_pdvs_are_split_as_ps3_8_frames_them() -> None:
    pdu = pdata_tf(1, 0b11, b"command")
    assert [(c, h, bytes(f)) for c, h, f in split_pdvs(pdu)] == [(1, 0b11, b"command")]
    pdvs = pdata_tf(3, 0b00, b"ab")[6:] + pdata_tf(3, 0b10, b"cd")[6:]  # two PDVs, one PDU
    joined = b"\x04\x00" + struct.pack(">I", len(pdvs)) + pdvs
    assert [(c, h, bytes(f)) for c, h, f in split_pdvs(joined)] == [(3, 0, b"ab"), (3, 2, b"cd")]


@pytest.mark.parametrize(
    "broken",
    [
        pdata_tf(1, 0b11, b"x")[:-1],  # shorter than its length says
        pdata_tf(1, 0b11, b"x") + b"\0",  # longer
        b"\x04\x00" + struct.pack(">I", 6) + struct.pack(">I", 1) + b"\x01\x03",  # item of 1
        b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # not a P-DATA-TF
    ],
)
def test_a_pdu_not_well_formed_is_left_to_pynetdicom(broken: bytes) -> None:
    assert split_pdvs(broken) is None


def test_a_c_store_command_set_reads_as_pydicom_reads_it() -> None:
    sop_instance = generate_uid()
    request = store_request(parse_command_set(c_store_command(DX, sop_instance)), 5)
    assert request is not None
    assert (request.MessageID, request.Priority, request.context_id) == (1, 0, 5)
    assert (request.AffectedSOPClassUID, request.AffectedSOPInstanceUID) == (DX, sop_instance)
    assert request.MoveOriginatorApplicationEntityTitle is None


def _command(**changes) -> bytes:
    return c_store_command(DX, generate_uid(), **changes)


@pytest.mark.parametrize(
    ("changes", "taken"),
    [
        ({}, True),
        ({"MoveOriginatorApplicationEntityTitle": "MOVER", "MoveOriginatorMessageID": 3}, True),
        ({"CommandField": 0x0030}, False),  # C-ECHO-RQ
        ({"CommandDataSetType": 0x0101}, False),  # no data set
        ({"CommandField": None}, False),
        ({"MessageID": None}, False),
        ({"AffectedSOPInstanceUID": None}, False),
        ({"AffectedSOPClassUID": "1.2.3.abc"}, False),  # not a UID pynetdicom takes as is
    ],
)
def test_only_a_whole_plain_c_store_request_is_taken(changes: dict, taken: bool) -> None:
    elements = parse_command_set(_command(**changes))
    assert elements is not None
    request = store_request(elements, 1)
    assert (request is not None) is taken
    if request is not None and "MoveOriginatorMessageID" in changes:
        assert request.MoveOriginatorApplicationEntityTitle == "MOVER"
        assert request.MoveOriginatorMessageID == 3


def test_a_command_set_cut_short_is_left_to_pynetdicom() -> None:
    assert parse_command_set(_command()[:-3]) is None
    assert parse_command_set(b"\x08\x00\x16\x00\x02\x00\x00\x00ab") is None  # not group 0


# --- served from the PDUs ---------------------------------------------------------------


def test_a_c_store_is_served_in_the_dul_thread_with_the_bytes_sent() -> None:
    ds = _image()
    with storage_scp() as scp, scu_association(scp) as assoc:
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000  # the association goes on
        assert assoc.send_c_store(_image()).Status == 0x0000
    assert [r.in_dul_thread for r in scp.received] == [True, True]
    assert scp.received[0].sop_instance == ds.SOPInstanceUID
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == DX)
    implicit = context.transfer_syntax[0] == ImplicitVRLittleEndian
    assert scp.received[0].data == encode_body(ds, implicit_vr=implicit)


def test_a_data_set_over_many_pdus_is_assembled_whole() -> None:
    ds = _image()  # ~130 KB of pixels in PDUs of at most 4 KB
    with storage_scp(max_pdu=4096) as scp, scu_association(scp) as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == DX)
    implicit = context.transfer_syntax[0] == ImplicitVRLittleEndian
    assert scp.received[0].in_dul_thread
    assert scp.received[0].data == encode_body(ds, implicit_vr=implicit)


def test_a_refusal_keeps_its_error_comment() -> None:
    answer = Dataset()
    answer.Status = 0xC210
    answer.ErrorComment = "cannot parse the data set"
    with storage_scp() as scp, scu_association(scp) as assoc:
        scp.answer = answer
        status = assoc.send_c_store(_image())
    assert (status.Status, status.ErrorComment) == (0xC210, "cannot parse the data set")
    assert scp.received[0].in_dul_thread  # this path's, answered by pynetdicom's send


def test_a_failing_handler_answers_0xc211_and_the_association_goes_on() -> None:
    with storage_scp() as scp, scu_association(scp) as assoc:
        scp.answer = RuntimeError("the handler broke")
        assert assoc.send_c_store(_image()).Status == 0xC211
        scp.answer = 0x0000
        assert assoc.send_c_store(_image()).Status == 0x0000
    assert [r.in_dul_thread for r in scp.received] == [True, True]


def test_a_handler_slower_than_the_idle_timeout_is_not_cut_off() -> None:
    """The reactor checks the idle timer while the DUL thread serves: it must not run."""
    with storage_scp(timeout=0.5) as scp, scu_association(scp) as assoc:
        scp.delay = 1.2
        assert assoc.send_c_store(_image()).Status == 0x0000
        scp.delay = 0
        assert assoc.send_c_store(_image()).Status == 0x0000
        assert assoc.is_established
    assert [r.in_dul_thread for r in scp.received] == [True, True]


def test_the_dimse_metrics_count_what_this_path_answers() -> None:
    counted = metrics().dimse_requests.labels("C-STORE", "0x0000")
    timed = metrics().store_seconds
    before, before_timed = counted._value.get(), _observations(timed)
    with storage_scp() as scp, scu_association(scp) as assoc:
        for _ in range(3):
            assert assoc.send_c_store(_image()).Status == 0x0000
    assert all(r.in_dul_thread for r in scp.received)
    assert counted._value.get() == before + 3
    assert _observations(timed) == before_timed + 3


def _observations(histogram) -> float:
    return next(
        s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count")
    )


# --- left to pynetdicom ----------------------------------------------------------------


def test_with_another_dimse_handler_bound_pynetdicom_serves() -> None:
    seen: list[str] = []
    watch = (evt.EVT_DIMSE_RECV, lambda event: seen.append(type(event.message).__name__))
    with storage_scp(extra_handlers=[watch]) as scp, scu_association(scp) as assoc:
        assert assoc.send_c_store(_image()).Status == 0x0000
    assert "C_STORE_RQ" in seen
    assert [r.in_dul_thread for r in scp.received] == [False]


def test_a_command_split_over_two_pdus_goes_through_pynetdicom() -> None:
    ds = _image()
    body = encode_body(ds)
    command = c_store_command(DX, ds.SOPInstanceUID)
    with storage_scp() as scp, scu_association(scp) as assoc:
        answered: list[str] = []
        assoc.bind(evt.EVT_DIMSE_RECV, lambda event: answered.append("response"))
        context_id = _explicit_vr_context(assoc)
        send_pdus(
            assoc,
            pdata_tf(context_id, 0b01, command[:20])
            + pdata_tf(context_id, 0b11, command[20:])
            + pdata_tf(context_id, 0b10, body),
        )
        # The response to the hand-made request reaches this side's reactor, which drops
        # it (nothing was sent through pynetdicom here); then the next plain request.
        _wait_for(lambda: answered and assoc.dimse.msg_queue.empty())
        time.sleep(0.2)
        assert assoc.send_c_store(_image()).Status == 0x0000
    assert scp.received[0].data == body and not scp.received[0].in_dul_thread
    assert scp.received[1].in_dul_thread


def test_a_command_inside_a_data_set_aborts_and_stores_nothing() -> None:
    ds = _image()
    body = encode_body(ds)
    command = c_store_command(DX, ds.SOPInstanceUID)
    with storage_scp() as scp, scu_association(scp) as assoc:
        context_id = _explicit_vr_context(assoc)
        send_pdus(
            assoc,
            pdata_tf(context_id, 0b11, command)
            + pdata_tf(context_id, 0b00, body[:100])
            + pdata_tf(context_id, 0b11, command),
        )
        _wait_for(lambda: assoc.is_aborted)
    assert scp.received == []


def _explicit_vr_context(assoc) -> int:
    """The ID of the accepted DX context in Explicit VR Little Endian (encode_body's)."""
    return next(
        c.context_id
        for c in assoc.accepted_contexts
        if c.abstract_syntax == DX and c.transfer_syntax[0] == ExplicitVRLittleEndian
    )


def _wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
