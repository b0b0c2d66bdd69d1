"""Query/Retrieve GET SCP: Patient Root and Study Root C-GET, every level.

The instances go back on the requester's own association, over the storage contexts it
proposed with SCP/SCU role selection (the node accepts the SCU role for every storage SOP
class, node.process.server). An instance whose SOP class the requester did not offer, or whose
stored syntax it did not offer and that cannot be converted to one it did, is a failed
sub-operation; the node's log says why. Instances sent as stored go from their files'
bytes, converted ones from their converted bytes, framed by the node on plain TCP: every write
to the requester's socket is whole under one lock (stored_send.serialise_writes), so that
the node's C-STOREs and anything pynetdicom's DUL thread writes never interleave. The
Pending C-GET responses are written by the node too (node.dicom.move_pending).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pynetdicom import evt

from node.context import NodeContext
from node.dicom.move_pending import stop_writing_pending, write_pending_directly
from node.dicom.retrieve import Retrieve, refuse, select_instances, sub_operations
from node.dicom.send_instances import send_without_delay
from node.dicom.stored_send import (
    send_stored_files,
    serialise_writes,
    stop_sending_stored_files,
)


def handle_get(event: evt.Event, context: NodeContext) -> Iterator[Any]:
    """EVT_C_GET handler (bound with the NodeContext as extra argument)."""
    retrieve = Retrieve("C-GET", event, destination=event.assoc.requestor.ae_title)
    on_response = retrieve.on_store_response
    event.assoc.bind(evt.EVT_DIMSE_RECV, on_response)
    send_without_delay(event.assoc)
    serialise_writes(event.assoc)
    write_pending_directly(event.assoc)
    send_stored_files(event.assoc)
    try:
        yield from _get(event, context, retrieve)
    finally:
        stop_sending_stored_files(event.assoc)
        stop_writing_pending(event.assoc)
        event.assoc.unbind(evt.EVT_DIMSE_RECV, on_response)
        retrieve.summary()


def _get(event: evt.Event, context: NodeContext, retrieve: Retrieve) -> Iterator[Any]:
    selection = select_instances(event, context, retrieve)
    if not isinstance(selection, list):
        yield from refuse(selection)
        return
    yield len(selection)
    yield from sub_operations(
        event, context, retrieve, selection, lambda: event.assoc.accepted_contexts
    )
