"""What the C-MOVE and C-GET SCPs share: the models, the selection, the sub-operations.

pynetdicom runs the C-STORE sub-operations (PS3.4 C.4.2.3, C.4.3.3): a handler yields one
(Pending, dataset) per instance, pynetdicom sends it, answers the requester with a Pending
response that carries the remaining, completed, failed and warning counts, and ends with
0x0000, 0xB000 and the Failed SOP Instance UID List, 0xA702 when every sub-operation
failed, or 0xFE00 (with the counts so far) when the handler yields Cancel after a C-CANCEL.

The instances are those C-FIND matches (storage.query.selection); each goes as
node.dicom.send_instances prepares it for the association: as its stored file's bytes,
never decoded, when the stored syntax was accepted (node.dicom.stored_send), else as a
converted copy framed the same way. Preparing an instance (reading, decoding, encoding it
again) runs in worker threads (send_instances.PreparedAhead) a few instances ahead of the
one being sent, so that decoding overlaps the sending (Pillow and the other decoders
release the GIL); the instances still go, and are logged, in order, and a C-CANCEL drops
what was prepared ahead. Two behaviours of pynetdicom this
relies on, pinned by tests/test_retrieve_pynetdicom.py:
- An instance that cannot go (no context for it, no conversion) is yielded as
  `unsendable(...)`, a dataset with its UIDs and no file meta: pynetdicom's `send_c_store`
  refuses it before anything is sent, and the sub-operation is counted failed with its
  SOP Instance UID in the Failed SOP Instance UID List. The reason is in the node's log.
- pynetdicom asks for the number of sub-operations before it takes a status: an identifier
  the node cannot process is answered as one failed sub-operation with 0xA900 or 0xC000
  and an ErrorComment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from sqlalchemy.exc import SQLAlchemyError

from node.context import NodeContext
from node.dicom.dimse import status_dataset
from node.dicom.send_instances import Outgoing, PreparedAhead, StoredInstance, prepare
from node.dicom.stored_send import read_ahead
from storage.query.errors import QueryError, UnprocessableQueryError
from storage.query.identifier import (
    STATUS_IDENTIFIER_MISMATCH,
    STATUS_UNABLE_TO_PROCESS,
    failure_status,
    query_model,
    request_from_identifier,
)
from storage.query.selection import retrieve_instances

log = logging.getLogger(__name__)

MOVE_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)
GET_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA701  # unable to calculate the number of matches
C_STORE_RSP = 0x8001
READ_AHEAD = 8  # files asked of the kernel ahead of the one being sent


class Retrieve:
    """One C-MOVE or C-GET as its log lines tell it: UIDs, counts and statuses only."""

    def __init__(self, service: str, event: evt.Event, destination: str) -> None:
        self.service = service
        self.destination = destination
        self.calling_ae = event.assoc.requestor.ae_title
        self.model = "?"
        self.level = "?"
        self.instances = 0
        self.counts = {"completed": 0, "warning": 0, "failed": 0}
        self.status: int | None = None  # a status the handler answered itself
        self._notes: dict[str, str] = {}
        self._awaiting: str | None = None  # the instance sent and not yet answered

    def sending(self, outgoing: Outgoing) -> None:
        self._notes[outgoing.instance.sop_instance_uid] = outgoing.describe()
        self._awaiting = outgoing.instance.sop_instance_uid

    def settle(self) -> None:
        """pynetdicom has moved on from the instance last sent: without a response (the
        receiver timed out, aborted, answered nonsense, or the association was gone) it
        failed. pynetdicom counts it so, but logs only an exception's text."""
        uid = self._awaiting
        if uid is None:
            return
        self._awaiting = None
        self._notes.pop(uid, None)
        self.counts["failed"] += 1
        log.warning(
            "%s SOP %s to %s failed: no response (timed out, aborted or not associated)",
            self.service,
            uid,
            self.destination,
        )

    def refused(self, outgoing: Outgoing) -> None:
        self.counts["failed"] += 1
        log.warning(
            "%s SOP %s to %s failed: %s",
            self.service,
            outgoing.instance.sop_instance_uid,
            self.destination,
            outgoing.refusal,
        )

    def on_store_response(self, event: evt.Event) -> None:
        """EVT_DIMSE_RECV of the association the sub-operations run on: one line per
        instance sent, with the receiver's status."""
        command = event.message.command_set
        if command.get("CommandField") != C_STORE_RSP or self._awaiting is None:
            return  # not a store response, or one that came after the node gave up
        self._awaiting = None
        code = int(command.Status)
        uid = str(command.get("AffectedSOPInstanceUID", ""))
        category = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure",))[0]
        key = {"Success": "completed", "Warning": "warning"}.get(category, "failed")
        self.counts[key] += 1
        log.info(
            "%s sent SOP %s to %s%s: 0x%04X",
            self.service,
            uid,
            self.destination,
            self._notes.pop(uid, ""),
            code,
        )

    def final_status(self) -> int | None:
        """The status the request was answered with: the handler's own, or the one
        pynetdicom derives from the counts (PS3.4 C.4.2.1.5)."""
        if self.status is not None:
            return self.status
        failed, warning = self.counts["failed"], self.counts["warning"]
        if self.instances and failed == self.instances:
            return 0xA702
        if failed or warning:
            return 0xB000
        return None

    def summary(self) -> None:
        self.settle()
        final = self.final_status()
        status = "" if final is None else f" status=0x{final:04X}"
        log.info(
            "%s %s level=%s to %s: instances=%d completed=%d warning=%d failed=%d%s calling AE %r",
            self.service,
            self.model,
            self.level,
            self.destination,
            self.instances,
            self.counts["completed"],
            self.counts["warning"],
            self.counts["failed"],
            status,
            self.calling_ae,
        )


def select_instances(
    event: evt.Event, context: NodeContext, retrieve: Retrieve
) -> list[StoredInstance] | Dataset:
    """The instances the request's identifier selects, or the failure status to answer."""
    sop_class = str(event.request.AffectedSOPClassUID)
    try:
        model = query_model(sop_class, ("Move", "Get"))
    except ValueError:
        return _failure(retrieve, STATUS_IDENTIFIER_MISMATCH, "not a MOVE or GET SOP class")
    retrieve.model = model.value
    try:
        identifier = _identifier(event)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        retrieve.level = level if level in _LEVELS else "?"  # logged: no free text
        with context.engine.connect() as conn:
            request = request_from_identifier(
                identifier, sop_class, relational=context.config.node.relational_queries
            )
            instances = retrieve_instances(conn, request)
    except QueryError as exc:
        return _failure(retrieve, failure_status(exc), exc.comment, exc.offending)
    except SQLAlchemyError as exc:
        log.error("%s index query failed: %s", retrieve.service, type(exc).__name__)
        return _failure(retrieve, STATUS_OUT_OF_RESOURCES, "index unavailable, try again")
    except Exception:
        log.exception("%s identifier could not be processed", retrieve.service)
        return _failure(retrieve, STATUS_UNABLE_TO_PROCESS, "identifier could not be processed")
    retrieve.instances = len(instances)
    return instances


def _identifier(event: evt.Event) -> Dataset:
    # pydicom decodes lazily: an identifier that does not decode is "unable to process".
    try:
        return event.identifier
    except Exception as exc:
        raise UnprocessableQueryError(f"cannot decode identifier: {type(exc).__name__}") from exc


def _failure(
    retrieve: Retrieve, code: int, comment: str, offending: tuple[int, ...] = ()
) -> Dataset:
    retrieve.status = code
    # The comment may quote a value of the identifier: the log says only the status.
    log.warning("%s refused with 0x%04X", retrieve.service, code)
    return status_dataset(code, comment, offending)


def refuse(failure: Dataset) -> Iterator[Any]:
    """The yields that answer a failure status (see the module docstring)."""
    yield 1
    yield failure, None


def unsendable(instance: StoredInstance) -> Dataset:
    """A stand-in that pynetdicom counts as a failed sub-operation without sending it."""
    stand_in = Dataset()
    stand_in.SOPClassUID = instance.sop_class_uid
    stand_in.SOPInstanceUID = instance.sop_instance_uid
    return stand_in


def sub_operations(
    event: evt.Event,
    context: NodeContext,
    retrieve: Retrieve,
    instances: Sequence[StoredInstance],
    accepted: Callable[[], Sequence[PresentationContext]],
) -> Iterator[tuple[int, Dataset | None]]:
    """(Pending, dataset) per instance, prepared for the contexts `accepted()` returns;
    Cancel as soon as the requester sent C-CANCEL. The association the sub-operations go
    on must send StoredFiles (stored_send.send_stored_files); the files of the next
    instances are read ahead, and prepared ahead, while one is sent."""
    paths = [str(context.archive.path_of(instance.file_path)) for instance in instances]
    read_ahead(paths[:READ_AHEAD])
    ahead = PreparedAhead(
        lambda instance: prepare(context.archive, instance, accepted(), retrieve.destination),
        instances,
    )
    try:
        for number, instance in enumerate(instances):
            if event.is_cancelled:
                retrieve.status = STATUS_CANCEL
                yield STATUS_CANCEL, None
                return
            read_ahead(paths[number + READ_AHEAD : number + READ_AHEAD + 1])
            outgoing = ahead.next()
            if outgoing.refusal:
                retrieve.refused(outgoing)
                yield STATUS_PENDING, unsendable(instance)
                continue
            retrieve.sending(outgoing)
            yield STATUS_PENDING, outgoing.payload
            retrieve.settle()
    finally:
        ahead.drop()

