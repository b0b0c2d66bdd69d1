"""Transfer syntax conversion for sending: a stored instance in a syntax the receiver took.

The archive keeps every file as it was received. When a receiver (a C-MOVE destination, a
C-GET requester, a result's destination) did not accept an instance's stored transfer
syntax, a copy is made in memory in one it did accept: compressed pixel data is decoded
with pydicom's pixel handlers (`Dataset.decompress`) and the dataset written in Explicit or
Implicit VR Little Endian. The SOP Instance UID stays: a change of transfer syntax is the
same instance (PS3.5 10), and the receiver must be able to match it to what it asked for.

Pixel data is decoded by pydicom's own choice of plugin, as the analysis decodes it
(ai.data.preprocess), so a converted copy holds the pixels the model saw. (Pillow alone decodes
JPEG Baseline about four times faster here, but differs by 1 in about 3 % of the pixels.)

What cannot be converted raises `ConversionError` with a reason short enough for a log
line: a syntax without a decoder here (MPEG, HEVC), pixel data that does not decode, and
Explicit VR Big Endian (whose OW pixel data pydicom would write unswapped).
"""

from __future__ import annotations

from collections.abc import Collection
from io import BytesIO

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# What a converted copy is written in, best first: every receiver must accept Implicit VR
# Little Endian (PS3.5 10.1), most prefer Explicit.
CONVERSION_TARGETS: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class ConversionError(Exception):
    """The instance cannot be written in the wanted transfer syntax; the message says why."""


def can_decode(syntax: str) -> bool:
    """Whether pixel data in `syntax` can be decoded here (native syntaxes need no decoder)."""
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        return False
    if not uid.is_encapsulated:
        return True
    try:
        return get_decoder(uid).is_available
    except (NotImplementedError, ValueError):
        return False


def choose_syntax(stored: str, accepted: Collection[str]) -> UID | None:
    """The syntax to send an instance stored in `stored` in, given the syntaxes the receiver
    accepted for its SOP class: the stored one when accepted (sent as it is), otherwise the
    first conversion target accepted, or None when there is none to convert to."""
    if stored in accepted:
        return UID(stored)
    if UID(stored) == ExplicitVRBigEndian:
        return None
    return next((target for target in CONVERSION_TARGETS if target in accepted), None)


def convert(dataset: Dataset, target: str) -> Dataset:
    """`dataset` (as read from its file, pixel data included) written in `target`, one of
    CONVERSION_TARGETS, and read back: its encoding is then the target's throughout.

    `dataset` itself is changed (decompressed in place); pass a fresh copy.
    """
    target_uid = UID(target)
    if target_uid not in CONVERSION_TARGETS:
        raise ConversionError(f"cannot convert to {target_uid.name}")
    source = UID(dataset.file_meta.get("TransferSyntaxUID", ""))
    if not source.is_transfer_syntax:
        raise ConversionError(f"stored transfer syntax {source or '(none)'} is not known here")
    if source == ExplicitVRBigEndian:
        raise ConversionError("Explicit VR Big Endian is not converted")
    has_pixels = any(keyword in dataset for keyword in _PIXEL_KEYWORDS)
    if source.is_encapsulated and has_pixels:
        if not can_decode(source):
            raise ConversionError(f"no decoder here for {source.name}")
        try:
            dataset.decompress(generate_instance_uid=False)
        except Exception as exc:  # every handler raises its own kind
            raise ConversionError(f"{source.name} pixel data does not decode: {exc}") from exc
    dataset.file_meta.TransferSyntaxUID = target_uid
    buffer = BytesIO()
    try:
        dcmwrite(
            buffer,
            dataset,
            implicit_vr=target_uid.is_implicit_VR,
            little_endian=True,
            enforce_file_format=True,
        )
    except Exception as exc:
        raise ConversionError(f"cannot write as {target_uid.name}: {exc}") from exc
    buffer.seek(0)
    return dcmread(buffer)
