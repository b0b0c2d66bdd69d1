"""Counting DIMSE requests by the status actually sent, and C-STORE time, from pynetdicom's
notification events: every handler's answer passes here, so none can be missed."""

from __future__ import annotations

import threading
import time

from pynetdicom import evt

from node.metrics.definitions import metrics

PENDING = (0xFF00, 0xFF01)  # C-FIND/C-MOVE/C-GET interim answers: the request goes on
MAX_OPEN_STORES = 10_000  # C-STORE requests awaiting an answer remembered (aborts leak)


class DimseMetrics:
    """EVT_DIMSE_RECV/EVT_DIMSE_SENT handlers of one listener."""

    def __init__(self) -> None:
        self._metrics = metrics()
        self._started: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple]:
        return [(evt.EVT_DIMSE_RECV, self.received), (evt.EVT_DIMSE_SENT, self.sent)]

    def received(self, event: evt.Event) -> None:
        message = event.message
        if type(message).__name__ != "C_STORE_RQ":
            return
        self.store_received(event.assoc, int(message.command_set.MessageID), time.perf_counter())

    def store_received(self, assoc: object, message_id: int, at: float) -> None:
        """A C-STORE request arrived at `at` (time.perf_counter); also called by the node's
        own C-STORE path (node.dicom.store_stream), which pynetdicom's events do not see."""
        with self._lock:
            if len(self._started) >= MAX_OPEN_STORES:
                self._started.clear()
            self._started[(id(assoc), message_id)] = at

    def sent(self, event: evt.Event) -> None:
        message = event.message
        name = type(message).__name__
        if not name.endswith("_RSP"):
            return
        command_set = message.command_set
        status = int(getattr(command_set, "Status", 0))
        if status in PENDING:
            return
        command = name[: -len("_RSP")].replace("_", "-")
        if command == "C-STORE":
            message_id = int(command_set.MessageIDBeingRespondedTo)
            self.store_answered(event.assoc, message_id, status)
        else:
            self._metrics.dimse_requests.labels(command, f"0x{status:04X}").inc()

    def store_answered(self, assoc: object, message_id: int, status: int) -> None:
        """A C-STORE request was answered with `status` (its final one)."""
        self._metrics.dimse_requests.labels("C-STORE", f"0x{status:04X}").inc()
        with self._lock:
            started = self._started.pop((id(assoc), message_id), None)
        if started is not None:
            self._metrics.store_seconds.observe(time.perf_counter() - started)
