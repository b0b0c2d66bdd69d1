"""The Storage SCP: a C-STORE request becomes one archived instance and a DIMSE status.

The dataset is taken as the sender encoded it (`event.encoded_dataset()`), never decoded:
only its header is parsed to check and index it. The answer is Success only after
`Archive.store_file_bytes` returns, that is once the file and its index row are durable.
Every refusal names its reason in ErrorComment, so the sender's log says what went wrong.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy.exc import OperationalError

from node.context import NodeContext
from node.dimse import status_dataset
from storage.archive import (
    InvalidDatasetError,
    UnreadableDatasetError,
    envelope_mismatch,
    read_header,
)

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3; the 0xC2xx codes are this node's "cannot understand").
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNREADABLE_DATASET = 0xC210
UNEXPECTED_ERROR = 0xC211
INVALID_UID = 0xC220

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


def handle_store(event: evt.Event, context: NodeContext) -> int | Dataset:
    """EVT_C_STORE handler: archive the instance as received, answer with its status."""
    calling_ae = event.assoc.requestor.ae_title.strip()
    affected = str(event.request.AffectedSOPInstanceUID or "")
    try:
        data = event.encoded_dataset()
        header = read_header(data)
        mismatch = _mismatch(header, event)
        if mismatch is not None:
            log.warning("refused SOP %s from %s: %s", affected, calling_ae, mismatch)
            return status_dataset(DOES_NOT_MATCH_SOP_CLASS, mismatch)
        outcome = context.archive.store_file_bytes(data, calling_ae=calling_ae, header=header)
    except UnreadableDatasetError as exc:
        log.warning("refused SOP %s from %s: %s", affected, calling_ae, exc)
        return status_dataset(UNREADABLE_DATASET, "cannot parse the dataset")
    except InvalidDatasetError as exc:
        log.warning("refused SOP %s from %s: %s", affected, calling_ae, exc)
        return status_dataset(INVALID_UID, str(exc))
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
