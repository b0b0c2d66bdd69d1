"""`node.network_timeout` counts the peer's silence only while the node waits for the peer.

pynetdicom's idle timer (the DUL's `_idle_timer`, checked by the association reactor)
restarts only when a PDU arrives. An SCP's reactor serves a request in its own thread and
checks the timer again once the final response is out, so a C-MOVE, C-GET or C-FIND that
took longer than the timeout ended in A-ABORT right after its Success: the caller had
been silent because it was waiting for the node. Here:

- on an association the node accepted, the timer restarts when the node has answered a
  request (`_serve_request` returned): from then on it waits for the peer;
- on an association the node requested (C-MOVE sub-operations, result deliveries), the
  peer is expected to speak only in answer to the node, and each of those waits has its
  own bound (`dimse_timeout`, `acse_timeout`, set from `network_timeout`); the idle timer
  is off, so the node's own work between sends (reading, converting a file) cannot abort
  the association.

`tests/test_long_retrieve.py` pins both; `node.dicom.pynetdicom_internals` checks the code
this relies on.
"""

from __future__ import annotations

from typing import Any


def restart_after_each_request(assoc: Any) -> None:
    """Restart an acceptor association's idle timer whenever the node has served a request."""
    serve = assoc._serve_request
    timer = assoc.dul._idle_timer

    def serve_then_wait(msg: Any, context_id: int) -> None:
        try:
            serve(msg, context_id)
        finally:
            timer.restart()

    assoc._serve_request = serve_then_wait


def no_idle_timeout_as_requestor(assoc: Any) -> None:
    """Turn the idle timer off on one of the node's requestor associations."""
    assoc.dul._idle_timer.timeout = None
