"""Query/Retrieve MOVE SCP: Patient Root and Study Root C-MOVE, every level.

The move destination is an AE title looked up in `[[peers]]` (the calling AE title says
who asks, not where anything listens): unknown is 0xA801. The instances the identifier
selects go over one association to the destination, opened by pynetdicom with the
contexts, AE title and TLS that node.dicom.send_instances gives for them; each is sent as stored
when the destination accepted its syntax, converted otherwise (node.dicom.retrieve). The
Pending responses to the requester are written as PDUs by the node (node.dicom.move_pending).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from node.config import Config, Peer
from node.context import NodeContext
from node.dicom.move_pending import stop_writing_pending, write_pending_directly
from node.dicom.peer_silence import no_idle_timeout_as_requestor
from node.dicom.retrieve import Retrieve, refuse, select_instances, sub_operations
from node.dicom.send_instances import connection_arguments, send_without_delay
from node.dicom.stored_send import send_stored_files

log = logging.getLogger(__name__)

MOVE_DESTINATION_UNKNOWN = 0xA801
MAX_SUB_OPERATIONS = 65535  # pynetdicom refuses more (the counts are US)


class _DestinationAssociation:
    """Holds the association pynetdicom opens to the destination, taken from its
    EVT_ACCEPTED, which fires before `associate` returns: so it is known when the first
    instance is prepared."""

    def __init__(self, retrieve: Retrieve, peer: Peer) -> None:
        self.retrieve = retrieve
        self.peer = peer
        self.assoc: Association | None = None

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_DIMSE_RECV, self.retrieve.on_store_response),
        ]

    def _accepted(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        send_stored_files(event.assoc)
        send_without_delay(event.assoc)
        no_idle_timeout_as_requestor(event.assoc)  # converting a file is the node's work
        log.info(
            "%s association to %s at %s:%d%s: %d of %d contexts accepted",
            self.retrieve.service,
            self.peer.ae_title,
            self.peer.host,
            self.peer.port,
            " with DICOM TLS" if self.peer.tls else "",
            len(event.assoc.accepted_contexts),
            len(event.assoc.accepted_contexts) + len(event.assoc.rejected_contexts),
        )

    def accepted_contexts(self) -> list[PresentationContext]:
        return self.assoc.accepted_contexts if self.assoc is not None else []


def handle_move(event: evt.Event, context: NodeContext) -> Iterator[Any]:
    """EVT_C_MOVE handler (bound with the NodeContext as extra argument)."""
    retrieve = Retrieve("C-MOVE", event, destination=(event.move_destination or "").strip())
    send_without_delay(event.assoc)  # a Pending response follows every sub-operation
    write_pending_directly(event.assoc)
    try:
        yield from _move(event, context, retrieve)
    finally:
        stop_writing_pending(event.assoc)
        retrieve.summary()


def _move(event: evt.Event, context: NodeContext, retrieve: Retrieve) -> Iterator[Any]:
    peer = context.config.peer(retrieve.destination)
    if peer is None:
        retrieve.status = MOVE_DESTINATION_UNKNOWN
        log.warning("C-MOVE destination %r is not in [[peers]]", retrieve.destination)
        yield None, None
        return
    selection = select_instances(event, context, retrieve)
    if not isinstance(selection, list):
        yield peer.host, peer.port, _probe_arguments(context.config, peer)
        yield from refuse(selection)
        return
    destination = _DestinationAssociation(retrieve, peer)
    arguments = connection_arguments(context.config, peer, selection)
    yield peer.host, peer.port, {**arguments, "evt_handlers": destination.handlers()}
    try:
        yield len(selection)
    except GeneratorExit:  # pynetdicom did not go on: it could not associate (0xA801)
        if 0 < len(selection) <= MAX_SUB_OPERATIONS:
            retrieve.status = MOVE_DESTINATION_UNKNOWN
            why = "no context accepted" if destination.assoc is not None else "no association"
            log.warning(
                "C-MOVE association to %s at %s:%d failed: %s",
                peer.ae_title,
                peer.host,
                peer.port,
                why,
            )
        raise
    yield from sub_operations(event, context, retrieve, selection, destination.accepted_contexts)


def _probe_arguments(config: Config, peer: Peer) -> dict[str, Any]:
    """pynetdicom associates before it takes a failure status: ask for Verification only."""
    arguments = connection_arguments(config, peer, [])
    return {**arguments, "contexts": [build_context(Verification)]}
