"""Why an instance was refused: one exception class per reason a sender must be told apart.

The Storage SCP maps each class to its own DIMSE status (node/dicom/storage_scp.py); import
counts them by message. Whatever the class, nothing of the instance was written or indexed.
"""

from __future__ import annotations


class StoreError(Exception):
    """An instance was refused; nothing of it was written or indexed."""


class UnreadableDatasetError(StoreError):
    """The bytes do not parse to their end as a DICOM dataset."""


class EncodingMismatchError(UnreadableDatasetError):
    """The dataset parses, but in another encoding than its transfer syntax says."""


class DeflateError(UnreadableDatasetError):
    """A Deflated dataset whose deflate stream is broken or cut."""


class InvalidDatasetError(StoreError):
    """The dataset lacks, or has an invalid, attribute the archive needs (a UID)."""


class TooLargeError(StoreError):
    """The instance (or what a Deflated one inflates to) exceeds the configured largest."""


class PixelDataError(StoreError):
    """The pixel data cannot be what the header and the transfer syntax describe."""


class PixelDataLengthError(PixelDataError):
    """Native pixel data whose length is not what Rows, Columns, ... imply."""


class PixelDataEncapsulationError(PixelDataError):
    """Pixel data encapsulated (or not) against its transfer syntax, or too few fragments."""


class PixelDataFrameError(PixelDataError):
    """A compressed frame that does not start or end with its codec's markers."""


class PixelDataDecodeError(PixelDataError):
    """A frame that the codec cannot decode (storage.verify_pixels)."""


class IdentityConflictError(StoreError):
    """The instance would move an existing study to another patient, or an existing
    series to another study. `uid` is the study or series that is held elsewhere."""

    def __init__(self, level: str, uid: str) -> None:
        self.level = level  # "study" or "series"
        self.uid = uid
        self.holder = "patient" if level == "study" else "study"
        super().__init__(f"{level} {uid} is held under another {self.holder}")
