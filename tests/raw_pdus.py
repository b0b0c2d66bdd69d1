"""Hand-made PDUs for tests that must misbehave on purpose, below pynetdicom's DIMSE layer
(PS3.8 9.3): a P-DATA-TF with chosen PDVs, a C-STORE-RQ command set, raw bytes on an
association's socket."""

from __future__ import annotations

import socket
import struct

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode


def pdata_tf(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV (PS3.8 9.3.5): control bit 0 command, bit 1 last."""
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0x00, len(pdv)) + pdv


def c_store_command(sop_class: str, sop_instance: str, **changes: object) -> bytes:
    """A C-STORE-RQ command set (Implicit VR LE) announcing a dataset; `changes` set other
    command elements by keyword (None removes one)."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0x0000
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    for keyword, value in changes.items():
        if value is None:
            delattr(command, keyword)
        else:
            setattr(command, keyword, value)
    elements = encode(command, True, True)
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<I", len(elements)) + elements


def send_pdus(assoc, pdus: bytes) -> socket.socket:
    """Write `pdus` on the association's own socket, past pynetdicom's DIMSE layer."""
    raw = assoc.dul.socket.socket
    assert raw is not None
    raw.sendall(pdus)
    return raw
