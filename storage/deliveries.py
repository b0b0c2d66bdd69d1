"""The durable delivery queue: which result goes to which AE, and when to try again.

A delivery row is written in the same transaction that marks its analysis job done, so a
result is either waiting to be sent or already sent, never forgotten. Several senders (the
`serve` of each host sharing a PostgreSQL index) may run at once: a sender claims due rows
by moving their next attempt a lease into the future in one guarded UPDATE, so each result
goes out from one sender; a sender that dies mid-send leaves its rows due again once the
lease ends. Retries back off
exponentially up to a ceiling; a row is marked delivered only after the destination
answered the C-STORE with Success or a warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, insert, select, update

from storage.models import Delivery, DeliveryState, Instance, utcnow


@dataclass(frozen=True)
class DueDelivery:
    delivery_id: int
    sop_instance_uid: str
    destination_ae: str
    attempts: int
    file_path: str
    sop_class_uid: str
    transfer_syntax_uid: str
    leased_until: datetime  # this sender holds it until then (`claim`)


# How long a claimed delivery is left to its sender before another may take it.
CLAIM_LEASE_SECONDS = 600.0


def enqueue(conn: Connection, sop_instance_uids: Iterable[str], destination_ae: str) -> None:
    """Add deliveries in the caller's transaction; an existing (uid, AE) pair is kept."""
    for uid in sop_instance_uids:
        exists = conn.scalar(
            select(Delivery.id).where(
                Delivery.sop_instance_uid == uid, Delivery.destination_ae == destination_ae
            )
        )
        if exists is None:
            now = utcnow()
            conn.execute(
                insert(Delivery).values(
                    sop_instance_uid=uid,
                    destination_ae=destination_ae,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    last_error="",
                )
            )


class DeliveryQueue:
    def __init__(
        self,
        engine: Engine,
        *,
        retry_initial_seconds: float,
        retry_max_seconds: float,
        max_attempts: int,
    ) -> None:
        self.engine = engine
        self.retry_initial = retry_initial_seconds
        self.retry_max = retry_max_seconds
        self.max_attempts = max_attempts

    def claim(
        self, limit: int = 100, lease_seconds: float = CLAIM_LEASE_SECONDS
    ) -> list[DueDelivery]:
        """Take up to `limit` due deliveries for this sender, oldest first.

        The rows' next attempt moves `lease_seconds` ahead (until `delivered` or
        `retry_later` records the outcome), so no other sender takes them meanwhile.
        """
        now = utcnow()
        lease_end = now + timedelta(seconds=lease_seconds)
        due_ids = (
            select(Delivery.id)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite ignores it
            .scalar_subquery()
        )
        with self.engine.begin() as conn:
            claimed = conn.scalars(
                update(Delivery)
                .where(
                    Delivery.id.in_(due_ids),
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                )
                .values(next_attempt_at=lease_end)
                .returning(Delivery.id)
            ).all()
            if not claimed:
                return []
            rows = conn.execute(
                select(
                    Delivery.id,
                    Delivery.sop_instance_uid,
                    Delivery.destination_ae,
                    Delivery.attempts,
                    Instance.file_path,
                    Instance.sop_class_uid,
                    Instance.transfer_syntax_uid,
                )
                .join(Instance, Instance.sop_instance_uid == Delivery.sop_instance_uid)
                .where(Delivery.id.in_(claimed))
                .order_by(Delivery.id)
            ).all()
        return [DueDelivery(*row, leased_until=lease_end) for row in rows]

    def release(self, deliveries: Iterable[DueDelivery]) -> int:
        """Make claimed deliveries whose outcome was not recorded due again now (a sender
        stopping mid-round); rows another sender or an outcome has touched stay as they are."""
        by_lease: dict[datetime, list[int]] = {}
        for delivery in deliveries:
            by_lease.setdefault(delivery.leased_until, []).append(delivery.delivery_id)
        released = 0
        with self.engine.begin() as conn:
            for lease, ids in by_lease.items():  # one claim: one lease
                result = conn.execute(
                    update(Delivery)
                    .where(
                        Delivery.id.in_(ids),
                        Delivery.state == DeliveryState.PENDING,
                        Delivery.next_attempt_at == lease,
                    )
                    .values(next_attempt_at=utcnow())
                )
                released += result.rowcount or 0
        return released

    def next_due_in(self) -> float | None:
        """Seconds until the next pending delivery is due (0 if overdue), None if none."""
        with self.engine.connect() as conn:
            soonest = conn.scalar(
                select(func.min(Delivery.next_attempt_at)).where(
                    Delivery.state == DeliveryState.PENDING
                )
            )
        if soonest is None:
            return None
        delta = soonest.replace(tzinfo=None) - utcnow().replace(tzinfo=None)
        return max(0.0, delta.total_seconds())

    def delivered(self, delivery_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    state=DeliveryState.DELIVERED,
                    attempts=Delivery.attempts + 1,
                    delivered_at=utcnow(),
                    last_error="",
                )
            )

    def retry_later(self, delivery: DueDelivery, error: str) -> DeliveryState:
        """Record a failed attempt; back off, or give up after max_attempts."""
        attempts = delivery.attempts + 1
        delay = min(self.retry_max, self.retry_initial * 2 ** (attempts - 1))
        gave_up = self.max_attempts and attempts >= self.max_attempts
        state = DeliveryState.FAILED if gave_up else DeliveryState.PENDING
        with self.engine.begin() as conn:
            conn.execute(
                update(Delivery)
                .where(Delivery.id == delivery.delivery_id)
                .values(
                    state=state,
                    attempts=attempts,
                    last_error=error[:2000],
                    next_attempt_at=utcnow() + timedelta(seconds=delay),
                )
            )
        return state

    def give_up(self, delivery: DueDelivery, error: str) -> None:
        """Record an attempt that no retry can change (nothing the destination accepts)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(Delivery)
                .where(Delivery.id == delivery.delivery_id)
                .values(
                    state=DeliveryState.FAILED,
                    attempts=delivery.attempts + 1,
                    last_error=error[:2000],
                )
            )

    def requeue_failed(self) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(Delivery)
                .where(Delivery.state == DeliveryState.FAILED)
                .values(state=DeliveryState.PENDING, next_attempt_at=utcnow())
            )
        return result.rowcount or 0


def image_delivered_seconds(engine: Engine, result_sop_instance_uid: str) -> float | None:
    """Seconds from the source image's arrival to now, when the delivery of this result
    was the last of its image's results still to deliver; None otherwise (or imported)."""
    from storage.models import AnalysisJob, JobResult

    with engine.connect() as conn:
        job_pk = conn.scalar(
            select(JobResult.job_pk).where(JobResult.sop_instance_uid == result_sop_instance_uid)
        )
        if job_pk is None:
            return None
        siblings = select(JobResult.sop_instance_uid).where(
            JobResult.job_pk == job_pk, JobResult.sop_instance_uid != ""
        )
        undelivered = conn.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.sop_instance_uid.in_(siblings),
                Delivery.state != DeliveryState.DELIVERED,
            )
        )
        if undelivered:
            return None
        received = conn.scalar(
            select(Instance.received_at)
            .join(AnalysisJob, AnalysisJob.sop_instance_uid == Instance.sop_instance_uid)
            .where(AnalysisJob.id == job_pk)
        )
    if received is None:
        return None
    age = utcnow().replace(tzinfo=None) - received.replace(tzinfo=None)
    return max(0.0, age.total_seconds())
