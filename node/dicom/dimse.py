"""DIMSE status datasets shared by the service handlers."""

from __future__ import annotations

from pydicom.dataset import Dataset

ERROR_COMMENT_LENGTH = 64  # ErrorComment is an LO


def status_dataset(code: int, comment: str, offending: tuple[int, ...] = ()) -> Dataset:
    """A status with its reason, which pynetdicom copies into the response: the sender's
    log then says what went wrong, not only a number."""
    status = Dataset()
    status.Status = code
    # ASCII only (the command set has no character set) and one value: a backslash from a
    # sender's UID would split it.
    text = comment.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    status.ErrorComment = text[:ERROR_COMMENT_LENGTH]
    if offending:
        status.OffendingElement = list(offending)
    return status
