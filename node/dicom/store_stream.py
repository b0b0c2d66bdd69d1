"""C-STORE requests taken straight from their P-DATA-TF PDUs and answered in the DUL thread.

pynetdicom receives a C-STORE request in two threads and many layers: its DUL thread
decodes each P-DATA-TF PDU into PDU, item and primitive objects, assembles the DIMSE
message, decodes the command set with pydicom and builds a request primitive (validating
every UID again); the association's reactor thread is then woken to dispatch it to the
service class, which triggers the handler and queues the response primitive for the DUL
thread to wake, encode and send. On four parallel associations that path costs about as
much CPU as the archive itself, and the node is CPU-bound there (docs/benchmarks/ingest.md).

`StoreStream` takes the plain case off that path: on an association the node accepted, a
P-DATA-TF PDU that begins a C-STORE request (command set complete in its first PDV, on an
accepted presentation context of the Storage Service Class), and the PDUs carrying the
rest of its data set, are split into their PDVs here (a few struct reads) and assembled;
the complete request goes to the handler bound to EVT_C_STORE (the node's
`handle_store`) in the DUL thread, and a plain Success goes back as the bytes pynetdicom
would send (node.dicom.store_response), written to the socket at once. Anything else, a
refusal with its Error Comment included, is answered by pynetdicom's own code.

What stays pynetdicom's: reading the PDU (through the node's guarded socket), its state
machine (a claimed PDU is still the Evt10 it is, in Sta6), and every other message: a
command split over PDUs, any other DIMSE service, and whatever arrives while pynetdicom is
assembling a message of its own. The node's DIMSE metrics count what this path answers
(node.metrics.dimse). The idle timer does not run while the handler works, as when the
reactor served it (node.dicom.peer_silence). Writes go through the association's write
lock on plain TCP (node.dicom.stored_send.serialise_writes), so a response never falls
inside a PDU another thread is writing.

This adapts pynetdicom's internals (`DULServiceProvider._decode_pdu`, the DT-2 action's
call of `DIMSEServiceProvider.receive_primitive`), checked in
node.dicom.pynetdicom_internals and pinned by tests/test_store_stream.py.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.dicom.find_stream import COMMAND_LAST, p_data_pdu
from node.dicom.store_response import PDV_HEADER, encode_store_response
from node.dicom.stored_send import serialise_writes
from node.metrics.dimse import DimseMetrics

log = logging.getLogger(__name__)

P_DATA_TF_TYPE = 0x04
C_STORE_RQ_COMMAND = 0x0001
NO_DATA_SET = 0x0101
HANDLER_FAILED = 0xC211  # what pynetdicom answers when the C-STORE handler raises
COMMAND_FLAG = 0x01  # message control header: the PDV is a command fragment
LAST_FLAG = 0x02  # message control header: the last fragment of its command or data set
# A UID that pynetdicom would take as it is (the archive checks the data set's own).
_PLAIN_UID = re.compile(rb"[0-9.]{1,64}")
# The notification events whose handlers this path would pass by: with any bound but the
# node's DIMSE metrics, the message goes through pynetdicom.
_PASSED_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)

Pdv = tuple[int, int, memoryview]  # (presentation context ID, control header, fragment)


def split_pdvs(pdu: bytes | bytearray) -> list[Pdv] | None:
    """The PDVs of a P-DATA-TF PDU (PS3.8 9.3.5), or None when it is not well formed (left
    for pynetdicom to refuse as it does)."""
    end = len(pdu)
    if end < 12 or pdu[0] != P_DATA_TF_TYPE or struct.unpack_from(">I", pdu, 2)[0] != end - 6:
        return None
    view = memoryview(pdu)
    pdvs: list[Pdv] = []
    offset = 6
    while offset < end:
        if offset + 6 > end:
            return None
        item_length = struct.unpack_from(">I", pdu, offset)[0]
        stop = offset + 4 + item_length
        if item_length < 2 or stop > end:
            return None
        pdvs.append((pdu[offset + 4], pdu[offset + 5], view[offset + 6 : stop]))
        offset = stop
    return pdvs


def parse_command_set(encoded: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of an Implicit VR Little Endian command set by element number, or None
    when it is not one this path reads (then pynetdicom decodes it)."""
    elements: dict[int, bytes] = {}
    data = bytes(encoded)
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            return None
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _uid(elements: dict[int, bytes], element: int) -> str | None:
    value = elements.get(element, b"").rstrip(b"\0 ")
    return value.decode("ascii") if _PLAIN_UID.fullmatch(value) else None


def _text(elements: dict[int, bytes], element: int) -> str | None:
    value = elements.get(element)
    if value is None:
        return None
    try:
        return value.decode("ascii").strip(" \0")
    except UnicodeDecodeError:
        return None


@dataclass
class StoreRequest:
    """What a C-STORE handler reads of its request (pynetdicom's C_STORE primitive names),
    made from the command set without pynetdicom's validating setters."""

    MessageID: int
    AffectedSOPClassUID: UID
    AffectedSOPInstanceUID: UID
    Priority: int
    MoveOriginatorApplicationEntityTitle: str | None
    MoveOriginatorMessageID: int | None
    DataSet: BytesIO = field(default_factory=BytesIO)
    context_id: int = 0
    received_at: float = 0.0
    # The node's DIMSE metrics bound to the association, found when the request is claimed.
    metrics: DimseMetrics | None = None


def store_request(elements: dict[int, bytes], context_id: int) -> StoreRequest | None:
    """The C-STORE request these command elements make, or None when they are not a plain
    one with a data set (another command, a UID that is not plain, a field missing)."""
    if _us(elements, 0x0100) != C_STORE_RQ_COMMAND:
        return None
    data_set_type = _us(elements, 0x0800)
    message_id = _us(elements, 0x0110)
    priority = _us(elements, 0x0700)
    sop_class = _uid(elements, 0x0002)
    sop_instance = _uid(elements, 0x1000)
    if data_set_type in (None, NO_DATA_SET) or message_id is None or priority is None:
        return None
    if sop_class is None or sop_instance is None:
        return None
    originator = _text(elements, 0x1030) if 0x1030 in elements else None
    if 0x1030 in elements and originator is None:
        return None
    originator_id = _us(elements, 0x1031) if 0x1031 in elements else None
    if 0x1031 in elements and originator_id is None:
        return None
    return StoreRequest(
        MessageID=message_id,
        AffectedSOPClassUID=UID(sop_class),
        AffectedSOPInstanceUID=UID(sop_instance),
        Priority=priority,
        MoveOriginatorApplicationEntityTitle=originator,
        MoveOriginatorMessageID=originator_id,
        context_id=context_id,
    )


@dataclass
class ClaimedPData:
    """A P-DATA-TF PDU this path took: its PDVs in order, split at the end of the request
    they carry (`rest`: PDVs after it, which pynetdicom gets as a P-DATA primitive)."""

    pdvs: list[Pdv]
    rest: list[Pdv]
    starts: StoreRequest | None = None  # the request whose command set opens this PDU
    broken: bool = False  # a command fragment inside a claimed request's data set

    def to_primitive(self) -> ClaimedPData:
        """What the DT-2 action hands to DIMSE: this object, taken back by StoreStream."""
        return self


def as_p_data(pdvs: list[Pdv]) -> P_DATA:
    """PDVs as pynetdicom's P-DATA primitive (control header first in each value)."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [
        (context_id, bytes((control,)) + bytes(fragment)) for context_id, control, fragment in pdvs
    ]
    return primitive


class StoreStream:
    """The C-STORE path of one accepted association (see the module docstring)."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self._decode = self.dul._decode_pdu
        self._receive = assoc.dimse.receive_primitive
        # Who owns the message the peer is sending, as the PDUs are read: None between
        # messages, "node" for a request claimed here, "pynetdicom" for anything else.
        self._owner: str | None = None
        self._request: StoreRequest | None = None  # the claimed request being assembled
        self._timer = self.dul._idle_timer

    def install(self) -> None:
        self.dul._decode_pdu = self.decode_pdu
        self.assoc.dimse.receive_primitive = self.receive_primitive
        serialise_writes(self.assoc)

    # -- reading, in the DUL thread as each PDU arrives --------------------------------

    def decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """DULServiceProvider._decode_pdu: a claimed P-DATA-TF PDU, or pynetdicom's."""
        if bytestream[:1] == b"\x04" and self.dul.state_machine.current_state == "Sta6":
            pdvs = split_pdvs(bytestream)
            if pdvs is not None:
                claimed = self._claim(pdvs)
                if claimed is not None:
                    return claimed, "Evt10"
                self._follow(pdvs)
        return self._decode(bytestream)

    def _claim(self, pdvs: list[Pdv]) -> ClaimedPData | None:
        """The PDU as this path's, when it opens or continues a claimed request."""
        starts = None
        if self._owner is None:
            context_id, control, fragment = pdvs[0]
            if control & 0x03 != COMMAND_FLAG | LAST_FLAG:
                return None
            starts = self._claimable(context_id, fragment)
            if starts is None:
                return None
            pdvs = pdvs[1:]
            self._owner = "node"
        elif self._owner != "node":
            return None
        claimed = ClaimedPData([], [], starts)
        for index, pdv in enumerate(pdvs):
            control = pdv[1]
            if control & COMMAND_FLAG:
                claimed.broken = True
                self._owner = None
                return claimed
            claimed.pdvs.append(pdv)
            if control & LAST_FLAG:
                self._owner = None
                claimed.rest = pdvs[index + 1 :]
                self._follow(claimed.rest)
                break
        return claimed

    def _claimable(self, context_id: int, command: memoryview) -> StoreRequest | None:
        """The request this command set opens, when this path may serve it."""
        assoc = self.assoc
        if _config.STORE_RECV_CHUNKED_DATASET or assoc._sent_release:
            return None
        context = assoc._accepted_cx.get(context_id)
        if context is None or not assoc.is_established:
            return None
        elements = parse_command_set(command)
        request = None if elements is None else store_request(elements, context_id)
        if request is None:
            return None
        class_uid = str(request.AffectedSOPClassUID)
        class_uid = assoc.acceptor.accepted_common_extended.get(class_uid, (class_uid,))[0]
        if _config.UNRESTRICTED_STORAGE_SERVICE:
            class_uid = "1.2.840.10008.5.1.4.1.1.1"
        if uid_to_service_class(class_uid) is not StorageServiceClass:
            return None
        handler = assoc.get_handlers(evt.EVT_C_STORE)
        if not handler or handler[0] is None or any(map(assoc.get_handlers, _PASSED_EVENTS)):
            return None
        watchers = {
            getattr(watcher, "__self__", None)
            for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)
            for watcher, _args in assoc.get_handlers(event)
        }
        if not all(isinstance(owner, DimseMetrics) for owner in watchers):
            return None  # a handler that would see every message: pynetdicom's path
        request.metrics = next(iter(watchers), None)
        return request

    def _follow(self, pdvs: list[Pdv]) -> None:
        """Track where pynetdicom's messages end in PDVs it gets, as its decoder does."""
        for _context_id, control, fragment in pdvs:
            if not control & COMMAND_FLAG:
                self._owner = None if control & LAST_FLAG else "pynetdicom"
                continue
            self._owner = "pynetdicom"
            if control & LAST_FLAG:
                elements = parse_command_set(fragment)
                if elements is not None and _us(elements, 0x0800) == NO_DATA_SET:
                    self._owner = None

    # -- serving, in the DUL thread as the state machine hands each PDU on ----------------

    def receive_primitive(self, primitive: Any) -> None:
        """DIMSEServiceProvider.receive_primitive: a claimed PDU is served here."""
        if not isinstance(primitive, ClaimedPData):
            self._receive(primitive)
            return
        if primitive.starts is not None:
            self._request = primitive.starts
            self._request.received_at = time.perf_counter()
        request = self._request
        if request is None or primitive.broken:
            # A command fragment inside a data set (or data with no request open): not
            # DICOM; ends as pynetdicom ends a message it cannot decode (Evt19: A-ABORT).
            log.error("C-STORE data set interrupted by a command fragment: aborting")
            self._request = None
            self.dul.event_queue.put("Evt19")
            return
        for _context_id, control, fragment in primitive.pdvs:
            request.DataSet.write(fragment)
            if control & LAST_FLAG:
                self._request = None
                self._serve(request)
        if primitive.rest:
            self._receive(as_p_data(primitive.rest))

    def _serve(self, request: StoreRequest) -> None:
        """Run the C-STORE handler and answer, as pynetdicom's Storage SCP does."""
        assoc = self.assoc
        if assoc._sent_release or not assoc.is_established:
            return
        context = assoc._accepted_cx[request.context_id]  # checked when it was claimed
        metrics = request.metrics
        if metrics is not None:
            metrics.store_received(assoc, request.MessageID, request.received_at)
        handler, args = assoc.get_handlers(evt.EVT_C_STORE)
        event = evt.Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        self._timer.stop()
        assoc.abort = assoc._abort_nonblocking  # the DUL thread cannot wait for itself
        try:
            status: int | Dataset = handler(event, *(args or ()))
        except Exception:
            log.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            status = HANDLER_FAILED
        finally:
            assoc.abort = assoc._abort_blocking
            self._timer.restart()
        if not assoc.is_established:
            return
        if type(status) is int and self._send_plain(request, status):
            if metrics is not None:
                metrics.store_answered(assoc, request.MessageID, status)
            return
        response = C_STORE()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response = StorageServiceClass(assoc).validate_status(status, response)
        assoc.dimse.send_msg(response, request.context_id)

    def _send_plain(self, request: StoreRequest, status: int) -> bool:
        """Write a response without Error Comment as one PDU; False when it cannot be."""
        if status not in StorageServiceClass.statuses:
            return False  # pynetdicom warns of it; its path sends it
        try:
            command = encode_store_response(
                request.MessageID,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                status,
            )
        except struct.error:
            return False
        max_pdu = int(self.assoc.dimse.maximum_pdu_size or 0)
        if max_pdu and len(command) + PDV_HEADER > max_pdu:
            return False
        self.dul.socket.send(p_data_pdu(request.context_id, COMMAND_LAST, command))
        return True


def stream_stores(assoc: Any) -> None:
    """Take the plain C-STOREs of an association the node accepted off pynetdicom's
    DIMSE path (the association's other messages stay pynetdicom's)."""
    StoreStream(assoc).install()
