"""Pending C-MOVE and C-GET responses written straight to the requester's socket.

After every C-STORE sub-operation pynetdicom sends the requester a Pending C-MOVE-RSP with
the counts so far: it builds a command set Dataset, encodes it with pydicom and queues it
for its DUL thread, about a millisecond per instance, as long as the C-STORE of a stored
file itself takes. `write_pending_directly(assoc)` replaces the DIMSE `send_msg` of the
requester's association, for the C-MOVE it serves, with one that encodes a Pending
response's command set by hand (byte for byte pynetdicom's, pinned by
tests/test_stored_send.py) and writes its one P-DATA-TF PDU to the socket; every other
message goes through pynetdicom as before.

As for node.dicom.find_stream: only on plain TCP, and only while the EVT_C_MOVE handler
runs, when nothing else writes to that association: the sub-operations go over another
association, the requester waits for the final response, and pynetdicom sends that final
response (through its DUL) only after the last Pending one was written.

A C-GET's Pending responses (C-GET-RSP, the same fields) go the same way while the EVT_C_GET
handler runs: its sub-operations share the association, but they are written by the same
thread (the association reactor, framed by node.dicom.stored_send) and every write there is
whole under the lock of stored_send.serialise_writes, which the DUL's writes take too.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from node.dicom.find_stream import COMMAND_LAST, PDV_OVERHEAD, p_data_pdu, plain_tcp_transport
from node.dicom.stored_send import command_element, padded_uid

STATUS_PENDING = 0xFF00
C_MOVE_RSP_FIELD = 0x8021
C_GET_RSP_FIELD = 0x8010
NO_DATA_SET = 0x0101


def pending_command_set(rsp: C_MOVE | C_GET) -> bytes:
    """The encoded command set of a Pending C-MOVE-RSP or C-GET-RSP without identifier
    (PS3.7 9.3.4.2, 9.3.3.2)."""
    field = C_GET_RSP_FIELD if isinstance(rsp, C_GET) else C_MOVE_RSP_FIELD
    body = b"".join(
        [
            command_element(0x0002, padded_uid(str(rsp.AffectedSOPClassUID))),
            command_element(0x0100, struct.pack("<H", field)),
            command_element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
            command_element(0x0800, struct.pack("<H", NO_DATA_SET)),
            command_element(0x0900, struct.pack("<H", rsp.Status)),
            command_element(0x1020, struct.pack("<H", rsp.NumberOfRemainingSuboperations)),
            command_element(0x1021, struct.pack("<H", rsp.NumberOfCompletedSuboperations)),
            command_element(0x1022, struct.pack("<H", rsp.NumberOfFailedSuboperations)),
            command_element(0x1023, struct.pack("<H", rsp.NumberOfWarningSuboperations)),
        ]
    )
    return command_element(0x0000, struct.pack("<I", len(body))) + body


def _writable(rsp: Any) -> bool:
    counts = (
        rsp.NumberOfRemainingSuboperations,
        rsp.NumberOfCompletedSuboperations,
        rsp.NumberOfFailedSuboperations,
        rsp.NumberOfWarningSuboperations,
    )
    return (
        isinstance(rsp, (C_MOVE, C_GET))
        and rsp.Status == STATUS_PENDING
        and rsp.MessageIDBeingRespondedTo is not None
        and rsp.AffectedSOPClassUID is not None
        and not rsp.Identifier
        and getattr(rsp, "MoveDestination", None) is None
        and all(count is not None for count in counts)
    )


def write_pending_directly(assoc: Association) -> None:
    """While the C-MOVE or C-GET is served, send its Pending responses as written PDUs."""
    wrapper = plain_tcp_transport(assoc)
    if wrapper is None:
        return
    dimse = assoc.dimse
    send_msg = dimse.send_msg
    max_pdu = int(dimse.maximum_pdu_size or 0)

    def send_pending_directly(primitive: Any, context_id: int) -> None:
        if _writable(primitive) and assoc.is_established:
            command = pending_command_set(primitive)
            if not max_pdu or len(command) + PDV_OVERHEAD <= max_pdu:
                wrapper.send(p_data_pdu(context_id, COMMAND_LAST, command))
                return
        send_msg(primitive, context_id)

    dimse.send_msg = send_pending_directly


def stop_writing_pending(assoc: Association) -> None:
    """Give the association's DIMSE provider back its own `send_msg`."""
    with contextlib.suppress(AttributeError):
        del assoc.dimse.send_msg
