"""C-STORE responses encoded without building a pydicom command set first.

pynetdicom turns each C-STORE response primitive into a message by filling an empty
command set Dataset element by element, encoding it once to learn its group length and
again to send it: about 0.2 ms of CPU per received instance, a tenth of what the node
spends on one. A C-STORE-RSP command set is seven fixed elements (PS3.7 9.3.1.2), so
`C_STORE_RSP` below encodes them in one go, byte for byte what pynetdicom sends
(tests/test_store_response.py compares them), and gives pynetdicom (and the node's DIMSE
metrics, which read it) the command set as pydicom reads those bytes back. A response
with anything more (an Error Comment, an Offending Element) or whose command set does not
fit in one PDU is made by pynetdicom's own class, as before.

It takes effect through pynetdicom's map of response primitives to message classes
(`pynetdicom.dimse._RSP_TO_MESSAGE`, checked in node.dicom.pynetdicom_internals).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pynetdicom.dimse
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import dimse_messages
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from storage.file_meta import uid_value

C_STORE_RSP_COMMAND = 0x8001
NO_DATA_SET = 0x0101
LAST_COMMAND_FRAGMENT = b"\x03"
PDV_HEADER = 6  # PDV item length (4), presentation context ID (1), control header (1)


def _element(element: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian (group 0000)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def encode_store_response(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The command set of a C-STORE-RSP without Error Comment or Offending Element."""
    body = b"".join(
        (
            _element(0x0002, uid_value(sop_class_uid)),
            _element(0x0100, struct.pack("<H", C_STORE_RSP_COMMAND)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, uid_value(sop_instance_uid)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _plain_response(primitive: Any) -> bytes | None:
    """The encoded command set of `primitive` when it is a plain C-STORE response (the
    fields above only), else None."""
    if not isinstance(primitive, C_STORE) or primitive.DataSet is not None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if message_id is None or status is None or not sop_class or not sop_instance:
        return None
    try:
        return encode_store_response(message_id, str(sop_class), str(sop_instance), status)
    except (UnicodeEncodeError, struct.error):
        return None


class C_STORE_RSP(dimse_messages.C_STORE_RSP):  # noqa: N801 - pynetdicom reads the name
    """pynetdicom's C-STORE-RSP message, made from the encoded command set when it can.

    The class keeps pynetdicom's name: pynetdicom and the node's DIMSE metrics tell a
    message's type by its class name.
    """

    def __init__(self) -> None:
        # The attributes of DIMSEMessage.__init__, without its filling of an empty command
        # set that primitive_to_message replaces anyway.
        self.context_id: int | None = None
        self.encoded_command_set = BytesIO()
        self.data_set: BytesIO | None = BytesIO()
        self.command_set = Dataset()
        self._data_set_path = None
        self._data_set_file = None
        self._encoded: bytes | None = None

    def primitive_to_message(self, primitive: Any) -> None:
        encoded = _plain_response(primitive)
        if encoded is None:
            made = dimse_messages.C_STORE_RSP()
            made.primitive_to_message(primitive)
            self.__dict__.update(made.__dict__)
            self._encoded = None
            return
        self._encoded = encoded
        self.command_set = read_dataset(
            BytesIO(encoded), is_implicit_VR=True, is_little_endian=True
        )

    def encode_msg(self, context_id: int, max_pdu_length: int) -> Any:
        encoded = self._encoded
        if encoded is None or (max_pdu_length and len(encoded) + PDV_HEADER > max_pdu_length):
            yield from super().encode_msg(context_id, max_pdu_length)
            return
        self.context_id = context_id
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + encoded))
        yield pdata


def install() -> None:
    """Have pynetdicom make its C-STORE responses with `C_STORE_RSP` (idempotent)."""
    pynetdicom.dimse._RSP_TO_MESSAGE[C_STORE] = C_STORE_RSP
