"""The durable analysis queue: claim a batch, finish or fail it, resume after a crash.

Several workers (threads or processes, on this or another machine) may share the index:
a claim is one UPDATE guarded by `state = queued`, tagged with a token unique to this
claim, so two workers never take the same job; on PostgreSQL the rows are chosen with
`FOR UPDATE SKIP LOCKED`, so concurrent claims take different jobs instead of waiting. A
job whose worker died stays claimed until its lease runs out (or, for a worker on this
host, until its process is found gone), then goes back to the queue.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from storage.models import AnalysisJob, Instance, JobResult, JobState, ResultState, utcnow

# Claims of one job by workers that died before finishing it, before it is failed.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds, with what it needs to read the source image."""

    job_id: int
    sop_instance_uid: str
    calling_ae: str
    file_path: str
    attempts: int


@dataclass(frozen=True)
class ResultRecord:
    """What became of one kind of result of a job (see storage.models.JobResult)."""

    kind: str
    state: ResultState
    sop_instance_uid: str = ""
    reason: str = ""


def worker_identity() -> str:
    """host:pid:random, so claims of a dead process on this host can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def process_alive(pid: int) -> bool:
    """Whether a process of this host is running (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobQueue:
    def __init__(self, engine: Engine, lease: timedelta = timedelta(minutes=15)) -> None:
        self.engine = engine
        self.lease = lease

    def queued_count(self) -> int:
        with self.engine.connect() as conn:
            return (
                conn.scalar(
                    select(func.count())
                    .select_from(AnalysisJob)
                    .where(AnalysisJob.state == JobState.QUEUED)
                )
                or 0
            )

    def claim(self, worker: str, limit: int) -> list[ClaimedJob]:
        """Take up to `limit` queued jobs, oldest first, for `worker`."""
        token = f"{worker}#{uuid.uuid4().hex[:8]}"
        now = utcnow()
        with self.engine.begin() as conn:
            oldest = (
                select(AnalysisJob.id)
                .where(AnalysisJob.state == JobState.QUEUED)
                .order_by(AnalysisJob.id)
                .limit(limit)
                # PostgreSQL: workers on other hosts take other rows instead of queueing
                # behind this claim's row locks (SQLite has no row locks and ignores it).
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            conn.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id.in_(oldest), AnalysisJob.state == JobState.QUEUED)
                .values(
                    state=JobState.CLAIMED,
                    claimed_by=token,
                    claimed_at=now,
                    attempts=AnalysisJob.attempts + 1,
                ),
            )
            rows = conn.execute(
                select(
                    AnalysisJob.id,
                    AnalysisJob.sop_instance_uid,
                    AnalysisJob.calling_ae,
                    Instance.file_path,
                    AnalysisJob.attempts,
                )
                .join(Instance, Instance.sop_instance_uid == AnalysisJob.sop_instance_uid)
                .where(AnalysisJob.claimed_by == token, AnalysisJob.state == JobState.CLAIMED)
                .order_by(AnalysisJob.id)
            ).all()
        return [ClaimedJob(*row) for row in rows]

    def finish(
        self,
        job_id: int,
        *,
        probability: float,
        label: str,
        results: Sequence[ResultRecord],
        note: str = "",
        conn: Connection | None = None,
    ) -> JobState:
        """Record a job's results, one row per kind; pass `conn` to do it in the caller's
        transaction. The job is done, or failed when a kind failed (its reason first), so
        that `pneumonode retry` makes what is missing; the kinds that were stored stay.

        `note` says why its results are not sent anywhere (kept on the node), if they are not.
        """
        failures = [f"{r.kind}: {r.reason}" for r in results if r.state == ResultState.FAILED]
        state = JobState.FAILED if failures else JobState.DONE
        statements = [
            update(AnalysisJob)
            .where(AnalysisJob.id == job_id)
            .values(
                state=state,
                probability=probability,
                label=label,
                finished_at=utcnow(),
                reason="; ".join([*failures, note] if note else failures)[:2000],
            ),
            delete(JobResult).where(JobResult.job_pk == job_id),  # an earlier try's rows
        ]
        rows = [
            {
                "job_pk": job_id,
                "kind": r.kind,
                "state": r.state,
                "sop_instance_uid": r.sop_instance_uid,
                "reason": r.reason[:2000],
            }
            for r in results
        ]
        if conn is not None:
            self._run(conn, statements, rows)
        else:
            with self.engine.begin() as own:
                self._run(own, statements, rows)
        return state

    @staticmethod
    def _run(conn: Connection, statements: list, rows: list[dict]) -> None:
        for statement in statements:
            conn.execute(statement)
        if rows:
            conn.execute(insert(JobResult), rows)

    def results_of(self, sop_instance_uid: str) -> dict[str, ResultRecord]:
        """The result rows of the job of one source instance, by kind."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    JobResult.kind, JobResult.state, JobResult.sop_instance_uid, JobResult.reason
                )
                .join(AnalysisJob, AnalysisJob.id == JobResult.job_pk)
                .where(AnalysisJob.sop_instance_uid == sop_instance_uid)
            ).all()
        return {row.kind: ResultRecord(*row) for row in rows}

    def fail(self, job_ids: Sequence[int], error: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id.in_(list(job_ids)))
                .values(state=JobState.FAILED, reason=error[:2000], finished_at=utcnow())
            )

    def skip(self, job_id: int, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id == job_id)
                .values(state=JobState.SKIPPED, reason=reason[:2000], finished_at=utcnow())
            )

    def release(self, job_ids: Sequence[int]) -> None:
        """Give claimed jobs back to the queue (a worker stopping mid-batch)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(AnalysisJob)
                .where(AnalysisJob.id.in_(list(job_ids)), AnalysisJob.state == JobState.CLAIMED)
                .values(state=JobState.QUEUED, claimed_by="", claimed_at=None)
            )

    def requeue_abandoned(self, now: datetime | None = None) -> int:
        """Put back claims whose worker process on this host is gone or whose lease ran out."""
        now = now or utcnow()
        host = socket.gethostname()
        abandoned: list[int] = []
        poisoned: list[int] = []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    AnalysisJob.id,
                    AnalysisJob.claimed_by,
                    AnalysisJob.claimed_at,
                    AnalysisJob.attempts,
                ).where(AnalysisJob.state == JobState.CLAIMED)
            ).all()
        expired_before = (now - self.lease).replace(tzinfo=None)
        for job_id, claimed_by, claimed_at, attempts in rows:
            parts = claimed_by.split("#")[0].split(":")
            same_host_dead = (
                len(parts) == 3
                and parts[0] == host
                and parts[1].isdigit()
                and not process_alive(int(parts[1]))
            )
            stale = claimed_at is None or claimed_at.replace(tzinfo=None) < expired_before
            if same_host_dead or stale:
                # An image whose analysis killed its worker again and again is given up on,
                # rather than crashing every worker that takes it.
                (poisoned if attempts >= MAX_ATTEMPTS else abandoned).append(job_id)
        if abandoned:
            self.release(abandoned)
        if poisoned:
            self.fail(poisoned, f"abandoned by a stopped worker {MAX_ATTEMPTS} times")
        return len(abandoned) + len(poisoned)

    def requeue_failed(self) -> int:
        """Queue failed jobs again (`pneumonode retry`), e.g. after fixing the model."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(AnalysisJob)
                .where(AnalysisJob.state == JobState.FAILED)
                .values(state=JobState.QUEUED, claimed_by="", claimed_at=None, reason="")
            )
        return result.rowcount or 0
