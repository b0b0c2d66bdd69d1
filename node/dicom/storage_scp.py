"""The Storage SCP: a C-STORE request becomes one archived instance and a DIMSE status.

The dataset is taken as the sender encoded it, never decoded: the node puts the file meta
group pynetdicom would (storage.file_meta) before the received bytes, and parses only the
dataset's header to check and index it. The answer is Success only after
`Archive.store_file_bytes` returns, that is once the file and its index row are durable.
Every refusal names its reason in ErrorComment, so the sender's log says what went wrong.
"""

from __future__ import annotations

import contextlib
import logging

from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import evt
from sqlalchemy.exc import OperationalError

from node.context import NodeContext
from node.dicom.dimse import ERROR_COMMENT_LENGTH, status_dataset
from node.metrics.definitions import metrics
from storage.archive import envelope_mismatch
from storage.errors import (
    DeflateError,
    EncodingMismatchError,
    IdentityConflictError,
    InvalidDatasetError,
    PixelDataDecodeError,
    PixelDataEncapsulationError,
    PixelDataFrameError,
    PixelDataLengthError,
    StoreError,
    TooLargeError,
    UnreadableDatasetError,
)
from storage.file_meta import PREAMBLE, decode_file_meta_group, encode_file_meta_group

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3): 0xA7xx out of resources, 0xA900 not the SOP class, and
# 0xCxxx "cannot understand", whose low bits this node uses to tell the reasons apart.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
INSTANCE_TOO_LARGE = 0xA710
DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNREADABLE_DATASET = 0xC210
UNEXPECTED_ERROR = 0xC211
ENCODING_MISMATCH = 0xC212
BROKEN_DEFLATE = 0xC213
INVALID_UID = 0xC220
PIXEL_DATA_LENGTH = 0xC230
PIXEL_DATA_ENCAPSULATION = 0xC231
PIXEL_DATA_FRAME = 0xC232
PIXEL_DATA_DECODE = 0xC233
STUDY_OF_ANOTHER_PATIENT = 0xC240
SERIES_OF_ANOTHER_STUDY = 0xC241

# Most specific class first: the first match gives the status.
REFUSAL_STATUSES: tuple[tuple[type[StoreError], int], ...] = (
    (EncodingMismatchError, ENCODING_MISMATCH),
    (DeflateError, BROKEN_DEFLATE),
    (UnreadableDatasetError, UNREADABLE_DATASET),
    (InvalidDatasetError, INVALID_UID),
    (TooLargeError, INSTANCE_TOO_LARGE),
    (PixelDataLengthError, PIXEL_DATA_LENGTH),
    (PixelDataEncapsulationError, PIXEL_DATA_ENCAPSULATION),
    (PixelDataFrameError, PIXEL_DATA_FRAME),
    (PixelDataDecodeError, PIXEL_DATA_DECODE),
)
_UID_ELEMENTS = {"study": 0x0020000D, "series": 0x0020000E}


def refusal_status(error: StoreError) -> Dataset:
    """The status, with ErrorComment (and the offending element), that `error` answers."""
    if isinstance(error, IdentityConflictError):
        code = STUDY_OF_ANOTHER_PATIENT if error.level == "study" else SERIES_OF_ANOTHER_STUDY
        # ErrorComment is an LO of 64 characters: a UID alone may fill it.
        comment = next(
            (
                c
                for c in (
                    f"{error.level} {error.uid} of other {error.holder}",
                    f"other {error.holder}: {error.uid}",
                )
                if len(c) <= ERROR_COMMENT_LENGTH
            ),
            error.uid,
        )
        return status_dataset(code, comment, (_UID_ELEMENTS[error.level],))
    code = next((c for kind, c in REFUSAL_STATUSES if isinstance(error, kind)), UNEXPECTED_ERROR)
    return status_dataset(code, str(error))


def _mismatch(header: Dataset, event: evt.Event) -> str | None:
    """Why the dataset does not belong to the request it came in, or None."""
    request = event.request
    return envelope_mismatch(
        header,
        sop_class=str(event.context.abstract_syntax),
        sop_instance="",
        envelope="presentation context",
    ) or envelope_mismatch(
        header,
        sop_class=str(request.AffectedSOPClassUID or ""),
        sop_instance=str(request.AffectedSOPInstanceUID or ""),
        envelope="request",
    )


def received_file(event: evt.Event) -> tuple[bytes, tuple[FileMetaDataset, int] | None]:
    """The received dataset as a whole DICOM file (preamble, file meta, dataset as sent),
    and its file meta with where the dataset starts; None when pynetdicom built it."""
    request = event.request
    sop_class = str(request.AffectedSOPClassUID or "")
    sop_instance = str(request.AffectedSOPInstanceUID or "")
    if sop_class and sop_instance:
        with contextlib.suppress(UnicodeEncodeError):  # a UID that is not one
            syntax = str(event.context.transfer_syntax)
            group = encode_file_meta_group(sop_class, sop_instance, syntax)
            data = b"".join((PREAMBLE, group, request.DataSet.getbuffer()))
            return data, (decode_file_meta_group(group), len(PREAMBLE) + len(group))
    # Not a request pynetdicom can make a file of either: it says why (or how).
    return event.encoded_dataset(), None


def handle_store(event: evt.Event, context: NodeContext) -> int | Dataset:
    """EVT_C_STORE handler: archive the instance as received, answer with its status."""
    calling_ae = event.assoc.requestor.ae_title.strip()
    affected = str(event.request.AffectedSOPInstanceUID or "")
    try:
        data, known_meta = received_file(event)
        metrics().received_bytes.inc(len(data))
        header = context.archive.inspect(data, known_meta=known_meta)
        mismatch = _mismatch(header, event)
        if mismatch is not None:
            log.warning("refused SOP %s from %s: %s", affected, calling_ae, mismatch)
            return status_dataset(DOES_NOT_MATCH_SOP_CLASS, mismatch)
        outcome = context.archive.store_file_bytes(data, calling_ae=calling_ae, header=header)
    except StoreError as exc:
        log.warning("refused SOP %s from %s: %s", affected, calling_ae, exc)
        return refusal_status(exc)
    except OSError as exc:
        log.error("cannot store SOP %s from %s: %s", affected, calling_ae, exc)
        return status_dataset(OUT_OF_RESOURCES, f"cannot write the file: {exc.strerror or exc}")
    except OperationalError as exc:
        log.error("cannot index SOP %s from %s: %s", affected, calling_ae, exc.orig)
        return status_dataset(OUT_OF_RESOURCES, "cannot write the index")
    except Exception:
        log.exception("unexpected error storing SOP %s from %s", affected, calling_ae)
        return status_dataset(UNEXPECTED_ERROR, "internal error while storing")
    record = outcome.record
    log.info(
        "%s SOP %s class %s from %s, %d bytes",
        outcome.action,
        record.sop_instance_uid,
        record.sop_class_uid,
        calling_ae,
        outcome.file_size,
    )
    return SUCCESS
