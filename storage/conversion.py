"""Transfer syntax conversion for sending: a stored instance in a syntax the receiver took.

The archive keeps every file as it was received. When a receiver (a C-MOVE destination, a
C-GET requester, a result's destination) did not accept an instance's stored transfer
syntax, a copy is made in memory in one it did accept: compressed pixel data is decoded
with pydicom's pixel handlers (`Dataset.decompress`) and the dataset written in Explicit or
Implicit VR Little Endian. The SOP Instance UID stays: a change of transfer syntax is the
same instance (PS3.5 10), and the receiver must be able to match it to what it asked for.

Each syntax is decoded by the fastest conformant plugin installed (`DECODERS`), falling back
to pydicom's own choice when that plugin is missing or refuses the data (Pillow takes no
12-bit JPEG): Pillow for greyscale JPEG Baseline and Extended, about four times pylibjpeg's
speed here; pylibjpeg-rle for RLE, far faster than pydicom's Python decoder. Colour JPEG
keeps pydicom's choice: with subsampled chroma (YBR_FULL_422) Pillow's upsampling differs
from pylibjpeg's by up to 2. Two conformant decoders of a
lossy JPEG may differ by 1 in a pixel value (PS3.5 8.2.1 allows it, the JPEG standard bounds
the decoder's error): that is no loss, so a converted copy may differ by 1 from the pixels
the analysis decoded (ai.data.preprocess). Lossless syntaxes decode bit-exact, whichever
plugin (tests/test_conversion.py checks it).

`encode_converted` gives the converted Part 10 bytes, which node.dicom.stored_send frames
as they are; `convert` reads them back as a Dataset for the paths that need one.

What cannot be converted raises `ConversionError` with a reason short enough for a log
line: a syntax without a decoder here (MPEG, HEVC), pixel data that does not decode, and
Explicit VR Big Endian (whose OW pixel data pydicom would write unswapped).
"""

from __future__ import annotations

import struct
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
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
)

# What a converted copy is written in, best first: every receiver must accept Implicit VR
# Little Endian (PS3.5 10.1), most prefer Explicit.
CONVERSION_TARGETS: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_DATA = 0x7FE00010

# The decoding plugins to try first, fastest first, per syntax (pydicom plugin names); any
# other syntax, colour JPEG, or when these fail, gets pydicom's own choice.
_JPEG = (JPEGBaseline8Bit, JPEGExtended12Bit)
DECODERS: dict[UID, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("pillow",),
    JPEGExtended12Bit: ("pillow",),
    RLELossless: ("pylibjpeg",),
}


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
    return dcmread(BytesIO(encode_converted(dataset, target)))


def encode_converted(dataset: Dataset, target: str) -> bytes:
    """`dataset` (as read from its file, pixel data included) as a Part 10 file in `target`,
    one of CONVERSION_TARGETS.

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
            decompress(dataset, source)
        except Exception as exc:  # every handler raises its own kind
            raise ConversionError(f"{source.name} pixel data does not decode: {exc}") from exc
    dataset.file_meta.TransferSyntaxUID = target_uid
    # The pixel data, when it is the last element (as it nearly always is), is appended
    # to the rest as it is rather than copied through pydicom's writer (a third of the
    # time of a conversion); tests/test_conversion.py checks the bytes are the writer's.
    pixels = dataset["PixelData"] if _pixels_last(dataset) else None
    if pixels is not None:
        del dataset.PixelData
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
    if pixels is not None:
        value = pixels.value
        buffer.write(_pixel_header(pixels.VR, dataset.BitsAllocated, len(value), target_uid))
        buffer.write(value)
        if len(value) % 2:
            buffer.write(b"\0")
    return buffer.getvalue()


def _pixels_last(dataset: Dataset) -> bool:
    """Whether native (decoded) Pixel Data is the dataset's last element."""
    if _PIXEL_DATA not in dataset or dataset.get("BitsAllocated") is None:
        return False
    element = dataset["PixelData"]
    return (
        not element.is_undefined_length
        and isinstance(element.value, bytes)
        and max(dataset.keys()) == _PIXEL_DATA
    )


def _pixel_header(vr: str, bits_allocated: int, length: int, target: UID) -> bytes:
    """The header of (7FE0,0010) with a native value of `length` bytes, as pydicom writes
    it: OB or OW as read or decoded, else by Bits Allocated (PS3.5 8.2); Implicit VR has
    no VR. The length is padded to even."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    length += length % 2
    if target.is_implicit_VR:
        return tag + struct.pack("<I", length)
    if vr not in ("OB", "OW"):
        vr = "OB" if bits_allocated <= 8 else "OW"
    return tag + vr.encode("ascii") + b"\0\0" + struct.pack("<I", length)


def decompress(dataset: Dataset, source: UID) -> None:
    """Decompress `dataset`'s pixel data in place with the fastest plugin that takes it."""
    available = set(get_decoder(source).available_plugins)
    preferred = DECODERS.get(source, ())
    if source in _JPEG and dataset.get("SamplesPerPixel", 1) != 1:
        preferred = ()
    for plugin in preferred:
        if plugin in available:
            try:
                dataset.decompress(generate_instance_uid=False, decoding_plugin=plugin)
                return
            except Exception:  # noqa: S112 - refused (e.g. 12-bit for Pillow): next one
                continue
    dataset.decompress(generate_instance_uid=False)
