"""Query/Retrieve FIND SCP: Patient Root and Study Root C-FIND over the index.

The matching lives in storage/query/; this handler reads the request, streams the
matches as Pending responses, stops on C-CANCEL, and turns an identifier it cannot
process into a failure status with an ErrorComment rather than an exception. Where it can
(plain TCP, Little Endian), the Pending responses are identifiers encoded from the rows
and written by node.dicom.find_stream, about a hundred times cheaper than pynetdicom's
path. Past query.max_results matches the answer ends with 0xA700, not Success.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy.exc import SQLAlchemyError

from node.context import NodeContext
from node.dicom.dimse import status_dataset
from node.dicom.find_stream import PendingWriter, fast_path_implicit_vr
from node.dicom.retrieve import GET_SOP_CLASSES, MOVE_SOP_CLASSES
from storage.query.encode_dimse import encoded_responses, response_datasets
from storage.query.errors import QueryError, UnprocessableQueryError
from storage.query.identifier import (
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_UNABLE_TO_PROCESS,
    failure_status,
    query_model,
    request_from_identifier,
)
from storage.query.sql import PreparedFind, prepare

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_PENDING_KEYS_UNSUPPORTED = 0xFF01  # matches go on; some optional keys were ignored
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700

FindResponse = tuple[int | Dataset, Dataset | None]


def handle_find(event: evt.Event, context: NodeContext) -> Iterator[FindResponse]:
    """EVT_C_FIND handler (bound with the NodeContext as extra argument)."""
    calling_ae = event.assoc.requestor.ae_title
    outcome = _FindOutcome()
    try:
        yield from _answer(event, context, outcome)
    finally:
        status = "none" if outcome.status is None else f"0x{outcome.status:04X}"
        log.info(
            "C-FIND %s level=%s matches=%d status=%s calling AE %r",
            outcome.model,
            outcome.level,
            outcome.matches,
            status,
            calling_ae,
        )


class _FindOutcome:
    """What the INFO summary line reports: no identifier values, so no patient data."""

    def __init__(self) -> None:
        self.model = "?"
        self.level = "?"
        self.matches = 0
        self.status: int | None = None  # stays None if the association ends mid-stream


def _answer(event: evt.Event, context: NodeContext, outcome: _FindOutcome) -> Iterator:
    sop_class = event.request.AffectedSOPClassUID
    try:
        model = query_model(sop_class, ("Find",))
    except ValueError:
        outcome.status = STATUS_IDENTIFIER_MISMATCH
        comment = "SOP class is not a supported FIND model"
        yield status_dataset(STATUS_IDENTIFIER_MISMATCH, comment), None
        return
    outcome.model = model.value
    try:
        request = request_from_identifier(
            _identifier(event), sop_class, relational=context.config.node.relational_queries
        )
        prepared = prepare(request)
    except QueryError as exc:
        outcome.status = failure_status(exc)
        # The comment may quote a query value (a birth date): the log names only the keys.
        log.warning("C-FIND refused (0x%04X) on %s", outcome.status, _tag_names(exc.offending))
        yield status_dataset(outcome.status, exc.comment, exc.offending), None
        return
    except Exception:
        # A shape of identifier nobody foresaw: answer it, keep serving, keep the traceback.
        log.exception("C-FIND identifier could not be processed")
        outcome.status = STATUS_UNABLE_TO_PROCESS
        yield status_dataset(STATUS_UNABLE_TO_PROCESS, "identifier could not be processed"), None
        return
    outcome.level = prepared.level.name
    if prepared.ignored_keys:
        log.info("C-FIND keys not supported for matching: %s", ", ".join(prepared.ignored_keys))
    yield from _stream(event, context, prepared, outcome)


def _tag_names(tags: tuple[int, ...]) -> str:
    names = [keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})" for tag in tags]
    return ", ".join(names) or "the identifier"


def _identifier(event: evt.Event) -> Dataset:
    # pydicom decodes elements lazily; request_from_identifier reports one it cannot read
    # by name.
    try:
        identifier = event.identifier
    except Exception as exc:
        raise UnprocessableQueryError(f"cannot decode identifier: {type(exc).__name__}") from exc
    return identifier


def _stream(
    event: evt.Event, context: NodeContext, prepared: PreparedFind, outcome: _FindOutcome
) -> Iterator[FindResponse]:
    pending = STATUS_PENDING_KEYS_UNSUPPORTED if prepared.ignored_keys else STATUS_PENDING
    ae_title = context.config.node.ae_title
    limit = context.config.query.max_results
    implicit_vr = fast_path_implicit_vr(event)
    writer = None if implicit_vr is None else _writer(event, pending)
    cut_short = cancelled = False
    try:
        with context.engine.connect() as conn:
            limited = prepared.limited(limit)
            if writer is None:
                matches: Iterator = response_datasets(limited, conn, ae_title)
            else:
                # Identifiers encoded from the rows, sent in batches (node.dicom.find_stream).
                matches = encoded_responses(limited, conn, ae_title, implicit_vr=implicit_vr)
            for identifier in matches:
                if event.is_cancelled:  # true once: pynetdicom forgets the C-CANCEL it reports
                    cancelled = True
                    break
                if limit and outcome.matches == limit:
                    cut_short = True
                    break
                outcome.matches += 1
                if writer is None:
                    yield pending, identifier
                elif not writer.write(identifier):
                    return  # the association is gone: nobody to answer
            if writer is not None and not writer.flush():
                return
    except SQLAlchemyError as exc:
        log.error("C-FIND index query failed: %s", type(exc).__name__)
        outcome.status = STATUS_OUT_OF_RESOURCES
        yield status_dataset(STATUS_OUT_OF_RESOURCES, "index unavailable, try again"), None
        return
    if cancelled or event.is_cancelled:
        outcome.status = STATUS_CANCEL
        yield STATUS_CANCEL, None
        return
    if cut_short:
        # Success would say every match was sent (PS3.4 C.4.1.3): say it was not.
        outcome.status = STATUS_OUT_OF_RESOURCES
        comment = f"more than {limit} matches (query.max_results): narrow the query"
        yield status_dataset(STATUS_OUT_OF_RESOURCES, comment), None
        return
    outcome.status = STATUS_SUCCESS
    yield STATUS_SUCCESS, None


def _writer(event: evt.Event, pending: int) -> PendingWriter | None:
    try:
        return PendingWriter(event, pending)
    except ValueError as exc:  # a peer PDU too small for the command set: pynetdicom's path
        log.info("C-FIND responses go through pynetdicom: %s", exc)
        return None


# Query/Retrieve SOP classes whose extended negotiation byte 1 means relational queries
# (FIND) or relational retrieval (MOVE, GET), PS3.4 C.5.1.1, C.5.2.1, C.5.3.1.
FIND_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
_RELATIONAL_NEGOTIATION_CLASSES = frozenset(
    (*FIND_SOP_CLASSES, *MOVE_SOP_CLASSES, *GET_SOP_CLASSES)
)


def handle_sop_extended(event: evt.Event, context: NodeContext) -> dict[str, bytes]:
    """EVT_SOP_EXTENDED: say truthfully what the node does with relational queries.

    Byte 1 is relational queries/retrieval (per node.relational_queries); the node claims
    none of the other options (combined date-time matching, fuzzy name matching, time
    zone adjustment), so their bytes are 0.
    """
    relational = 1 if context.config.node.relational_queries else 0
    return {
        uid: bytes([relational]) + bytes(max(len(info) - 1, 0))
        for uid, info in event.app_info.items()
        if str(uid) in _RELATIONAL_NEGOTIATION_CLASSES and info
    }
