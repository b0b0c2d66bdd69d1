"""The File Meta Information of a received C-STORE dataset, encoded without a Dataset.

A received dataset becomes a file by putting a preamble and a file meta group before the
bytes as they came. pynetdicom builds that group as a pydicom FileMetaDataset and writes
it (`Event.encoded_dataset`), which costs the node more CPU per image than parsing the
dataset's header does. The group holds seven fixed elements (PS3.10 7.1), so this module
encodes exactly what pynetdicom writes, byte for byte (tests/test_file_meta.py compares
them), in a few microseconds, and reads it back into a FileMetaDataset through pydicom
only lazily, as raw elements.
"""

from __future__ import annotations

import io
import struct

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"
_VERSION_ELEMENT = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 2 element of a 2-byte-length VR, Explicit VR Little Endian."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def uid_value(value: str) -> bytes:
    """A UI value as PS3.5 6.2 pads it: to even length with a NUL."""
    encoded = value.encode("ascii")
    return encoded + b"\x00" * (len(encoded) % 2)


def _short_string(value: str) -> bytes:
    """An SH value padded to even length with a space."""
    encoded = value.encode("ascii")
    return encoded + b" " * (len(encoded) % 2)


# The implementation elements are the same in every file: encoded once.
_IMPLEMENTATION = _short_element(
    0x0012, b"UI", uid_value(PYNETDICOM_IMPLEMENTATION_UID)
) + _short_element(0x0013, b"SH", _short_string(PYNETDICOM_IMPLEMENTATION_VERSION))


def encode_file_meta_group(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> bytes:
    """The file meta group (0002,xxxx) pynetdicom writes for a C-STORE dataset.

    Raises UnicodeEncodeError for a UID that is not ASCII (no valid UID is such).
    """
    body = b"".join(
        (
            _VERSION_ELEMENT,
            _short_element(0x0002, b"UI", uid_value(sop_class_uid)),
            _short_element(0x0003, b"UI", uid_value(sop_instance_uid)),
            _short_element(0x0010, b"UI", uid_value(transfer_syntax)),
            _IMPLEMENTATION,
        )
    )
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def decode_file_meta_group(group: bytes) -> FileMetaDataset:
    """The group as pydicom's FileMetaDataset, its values converted only when read."""
    return FileMetaDataset(
        read_dataset(io.BytesIO(group), is_implicit_VR=False, is_little_endian=True)
    )
