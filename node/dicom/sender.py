"""The result sender: C-STORE of queued deliveries to their destination AE, with retries.

Deliveries are read from the index, grouped by destination, and sent over one association
per destination and round, by node.dicom.send_instances as C-MOVE sends: as stored when the
destination accepts the stored transfer syntax, converted to an uncompressed one when it
does not. A delivery is marked delivered only after the destination answered Success or a
warning; a refused association, a network error or a failure status schedules the next
attempt with exponential backoff; an instance that can go neither as stored nor converted
fails at once (`pneumonode retry` queues it again). Because the queue is in the database,
deliveries pending at a crash or stop resume at the next start.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from node.config import Peer
from node.context import NodeContext
from node.dicom.peer_silence import no_idle_timeout_as_requestor
from node.dicom.send_instances import (
    Outgoing,
    PreparedAhead,
    connection_arguments,
    prepare,
    requestor_ae,
    send,
    send_without_delay,
)
from node.metrics.definitions import DELIVERED, FAILED, GIVEN_UP, metrics
from node.nudges import DELIVERIES_NUDGE, NudgeListener, nudge_address
from storage.deliveries import DeliveryQueue, DueDelivery, image_delivered_seconds
from storage.models import DeliveryState

log = logging.getLogger(__name__)

# Results may be queued by a worker in another process, which nudges the sender
# (node.nudges); without a nudge it looks this often.
IDLE_POLL_SECONDS = 0.5
# However often nudged, at most one round per this many seconds: a local process sending
# nudges in a loop cannot make the sender take the index's write lock without pause.
MIN_ROUND_SECONDS = 0.01
SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116} | set(range(0xB000, 0xC000))


class DeliverySender:
    """Background thread that empties the delivery queue."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        settings = context.config.delivery
        self.queue = DeliveryQueue(
            context.engine,
            retry_initial_seconds=settings.retry_initial_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            max_attempts=settings.max_attempts,
        )
        self._nudges: NudgeListener | None = None  # listening while started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._nudges = NudgeListener(
            nudge_address(self.context.config.storage.folder, DELIVERIES_NUDGE)
        )
        self._thread = threading.Thread(
            target=self._loop, args=(self._nudges,), name="delivery", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._nudges is None:
            return
        self._nudges.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._nudges.close()
            self._nudges = None

    def _loop(self, nudges: NudgeListener) -> None:
        while not self._stop.is_set():
            try:
                sent = self.send_due()
            except Exception:
                log.exception("delivery round failed; retrying")
                sent = 0
            if sent:
                continue
            wait = self.queue.next_due_in()
            timeout = IDLE_POLL_SECONDS if wait is None else min(IDLE_POLL_SECONDS, wait)
            if nudges.wait(max(MIN_ROUND_SECONDS, timeout)):
                self._stop.wait(MIN_ROUND_SECONDS)

    def send_due(self) -> int:
        """Try every due delivery once; returns how many were attempted."""
        due = self.queue.claim()
        by_destination: dict[str, list[DueDelivery]] = defaultdict(list)
        for delivery in due:
            by_destination[delivery.destination_ae].append(delivery)
        try:
            for destination, items in by_destination.items():
                if self._stop.is_set():
                    break
                self._send_to(destination, items)
        finally:
            # Stopped (or failed) mid-round: what was not attempted is due again at once,
            # here after a restart or at another sender, not when the claim's lease ends.
            self.queue.release(due)
        return len(due)

    def _send_to(self, destination: str, items: list[DueDelivery]) -> None:
        config = self.context.config
        peer = config.peer(destination)
        if peer is None:
            for item in items:
                self._retry(item, f"{destination} is not in [[peers]]")
            return
        # The index knows each result's SOP class and transfer syntax: no file is read
        # before the association is up.
        assoc = requestor_ae(config).associate(
            peer.host, peer.port, **connection_arguments(config, peer, items)
        )
        if not assoc.is_established:
            self._not_associated(assoc, peer, items)
            return
        send_without_delay(assoc)
        no_idle_timeout_as_requestor(assoc)  # reading the next file is the node's work
        try:
            ahead = PreparedAhead(
                lambda item: prepare(
                    self.context.archive, item, assoc.accepted_contexts, destination
                ),
                items,
            )
            try:
                for item in items:
                    if self._stop.is_set() or not assoc.is_established:
                        break
                    self._send_one(assoc, item, destination, ahead.next())
            finally:
                ahead.drop()
        finally:
            if assoc.is_established:
                assoc.release()

    def _not_associated(self, assoc, peer: Peer, items: list[DueDelivery]) -> None:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # It answered, and takes none of these SOP classes even uncompressed.
            error = f"{peer.ae_title} accepted none of the contexts proposed"
            log.warning("delivery to %s failed: %s (failed)", peer.ae_title, error)
            for item in items:
                self._give_up(item, error)
            return
        reason = "association rejected" if assoc.is_rejected else "cannot connect"
        error = f"{reason} by {peer.ae_title} at {peer.host}:{peer.port}"
        log.warning("delivery to %s failed: %s; will retry", peer.ae_title, error)
        for item in items:
            self._retry(item, error)

    def _retry(self, item: DueDelivery, error: str) -> DeliveryState:
        state = self.queue.retry_later(item, error)
        metrics().deliveries.labels(GIVEN_UP if state == DeliveryState.FAILED else FAILED).inc()
        return state

    def _give_up(self, item: DueDelivery, error: str) -> None:
        self.queue.give_up(item, error)
        metrics().deliveries.labels(GIVEN_UP).inc()

    def _delivered(self, item: DueDelivery) -> None:
        self.queue.delivered(item.delivery_id)
        counted = metrics()
        counted.deliveries.labels(DELIVERED).inc()
        seconds = image_delivered_seconds(self.context.engine, item.sop_instance_uid)
        if seconds is not None:
            counted.result_seconds.observe(seconds)

    def _send_one(self, assoc, item: DueDelivery, destination: str, outgoing: Outgoing) -> None:
        if outgoing.refusal:
            # Neither as stored nor converted: another attempt would meet the same answer.
            self._give_up(item, outgoing.refusal)
            log.warning(
                "delivery of SOP %s to %s failed: %s (%s)",
                item.sop_instance_uid,
                destination,
                outgoing.refusal,
                DeliveryState.FAILED.value,
            )
            return
        try:
            code = send(assoc, outgoing)
        except Exception as exc:
            self._retry(item, f"C-STORE error: {exc}")
            return
        if code is None:
            self._retry(item, "no C-STORE response (timeout or abort)")
            log.warning("delivery of SOP %s to %s: no response", item.sop_instance_uid, destination)
            return
        if code in SUCCESS_OR_WARNING:
            self._delivered(item)
            log.info(
                "delivered SOP %s to %s%s (status 0x%04X)",
                item.sop_instance_uid,
                destination,
                outgoing.describe(),
                code,
            )
            return
        state = self._retry(item, f"C-STORE status 0x{code:04X}")
        log.warning(
            "delivery of SOP %s to %s refused with 0x%04X (%s)",
            item.sop_instance_uid,
            destination,
            code,
            state.value,
        )
