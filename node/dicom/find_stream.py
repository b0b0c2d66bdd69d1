"""Pending C-FIND responses written straight to the association's socket, many per write.

pynetdicom sends each Pending response by building a command set Dataset, encoding it and
the identifier with pydicom, and queueing one P-DATA primitive per fragment for its reactor
thread to turn into a PDU and send: about a millisecond per match, ten seconds for 10,000
studies. Yet every Pending response of one C-FIND has the same command set; only the
identifier changes. `PendingWriter` encodes the command set once (with pynetdicom's own
message classes, so the bytes are the ones it would send), wraps each identifier in the
same P-DATA-TF PDUs pynetdicom would make (command PDV in one PDU, the data set fragmented
to the peer's maximum PDU length in the following ones), and hands them to the socket in
batches of about 64 KB: TCP carries the same PDUs, in the same order, in fewer system
calls.

This adapts pynetdicom's internals, and tests/test_find_stream.py pins what it relies on:
- `assoc.dul.socket.send(bytes)` (AssociationSocket) sends it all or queues Evt17;
- `assoc.dimse.maximum_pdu_size` is the peer's maximum PDU length (0: unlimited);
- while the EVT_C_FIND handler runs, nothing else writes to the association: the SCU waits
  for the final response, and pynetdicom sends that final response (through its reactor)
  only after the handler yields it, after the last batch was written.
It is used only on plain TCP (an SSL socket must not be written by one thread while the
reactor reads it in another) and for the Little Endian transfer syntaxes; otherwise the
handler yields Datasets to pynetdicom as before.
"""

from __future__ import annotations

import ssl
import struct
from io import BytesIO
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode

P_DATA_TF = b"\x04\x00"
COMMAND_MORE = 0x01  # message control header: command, more fragments follow
COMMAND_LAST = 0x03  # message control header: command, last fragment
DATA_MORE = 0x00  # data set, more fragments follow
DATA_LAST = 0x02  # data set, last fragment
PDV_OVERHEAD = 6  # item length (4), presentation context ID (1), control header (1)
FLUSH_BYTES = 64 * 1024
_FAST_SYNTAXES = {ImplicitVRLittleEndian: True, ExplicitVRLittleEndian: False}


def plain_tcp_transport(assoc: Any) -> Any:
    """The association's pynetdicom socket wrapper when the node may write PDUs to it
    itself (connected, plain TCP); None otherwise (TLS, or no socket)."""
    try:
        wrapper = assoc.dul.socket
        raw = wrapper.socket
    except AttributeError:
        return None
    if raw is None or isinstance(raw, ssl.SSLSocket) or not hasattr(wrapper, "send"):
        return None
    return wrapper


def fast_path_implicit_vr(event: evt.Event) -> bool | None:
    """True/False (implicit VR or not) when `PendingWriter` can answer this C-FIND; None
    when the handler must go through pynetdicom (TLS, Big Endian, Deflated)."""
    try:
        syntax = event.context.transfer_syntax
    except AttributeError:
        return None
    if plain_tcp_transport(event.assoc) is None:
        return None
    return _FAST_SYNTAXES.get(syntax)


def pdv_header(context_id: int, control: int, length: int) -> bytes:
    """The PDU and PDV headers of a P-DATA-TF PDU carrying one PDV of `length` bytes."""
    item_length = length + 2
    return P_DATA_TF + struct.pack(">IIBB", item_length + 4, item_length, context_id, control)


def p_data_pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU carrying one PDV (PS3.8 9.3.5)."""
    return pdv_header(context_id, control, len(fragment)) + fragment


def command_set(event: evt.Event, status: int) -> bytes:
    """The encoded command set of a Pending C-FIND-RSP to this request, as pynetdicom's
    service class would build it (Implicit VR Little Endian, PS3.7 6.3.1)."""
    request = event.request
    rsp = C_FIND()
    rsp.MessageID = request.MessageID
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    rsp.Status = status
    rsp.Identifier = BytesIO(b"\0\0")  # any data set: CommandDataSetType says one follows
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    encoded = encode(message.command_set, True, True)
    if not encoded:
        raise ValueError("pynetdicom could not encode the C-FIND-RSP command set")
    return encoded


class PendingWriter:
    """Sends Pending responses (a fixed command set + one identifier each) in batches."""

    def __init__(self, event: evt.Event, status: int) -> None:
        self._assoc = event.assoc
        self._socket = event.assoc.dul.socket
        self._context_id = int(event.context.context_id)
        max_pdu = int(event.assoc.dimse.maximum_pdu_size or 0)
        # The largest data set fragment one PDU may carry (0: no limit).
        self._fragment = max(max_pdu - PDV_OVERHEAD, 1) if max_pdu else 0
        command = command_set(event, status)
        if self._fragment and len(command) > self._fragment:
            raise ValueError("peer's maximum PDU length is below one C-FIND-RSP command set")
        self._command_pdu = p_data_pdu(self._context_id, COMMAND_LAST, command)
        self._batch: list[bytes] = []
        self._batched = 0

    def write(self, identifier: bytes) -> bool:
        """Queue one Pending response; False once the association is gone."""
        self._batch.append(self._command_pdu)
        fragment = self._fragment
        if not fragment or len(identifier) <= fragment:
            self._batch.append(p_data_pdu(self._context_id, DATA_LAST, identifier))
        else:
            view = memoryview(identifier)
            for start in range(0, len(identifier), fragment):
                last = start + fragment >= len(identifier)
                control = DATA_LAST if last else DATA_MORE
                self._batch.append(
                    p_data_pdu(self._context_id, control, bytes(view[start : start + fragment]))
                )
        self._batched += len(identifier) + 64
        if self._batched >= FLUSH_BYTES:
            return self.flush()
        return True

    def flush(self) -> bool:
        """Send what is batched; False once the association is gone."""
        if self._batch:
            data = b"".join(self._batch)
            self._batch.clear()
            self._batched = 0
            if not self._assoc.is_established:
                return False
            self._socket.send(data)
        return bool(self._assoc.is_established)
