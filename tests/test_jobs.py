"""The analysis queue's claims: exclusive, resumed after a worker dies, given up when poisoned;
the delivery queue's claims: exclusive between senders, released when not attempted."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update
from support import siim_files

from node.eligibility import Eligibility
from storage.archive import Archive
from storage.database import create_index_engine
from storage.deliveries import DeliveryQueue, enqueue
from storage.filestore import FileStore
from storage.jobs import MAX_ATTEMPTS, JobQueue
from storage.models import AnalysisJob, Instance, JobState


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    eligibility = Eligibility(["CR", "DX"], ["CHEST", ""])
    archive = Archive(FileStore(tmp_path), engine, decide_job=eligibility)
    for path in siim_files()[:5]:
        archive.store_file_bytes(path.read_bytes(), calling_ae="TEST")
    return JobQueue(engine)


def _dead_worker() -> str:
    """A worker identity on this host whose process has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:gone"


def test_claims_are_exclusive_and_oldest_first(queue: JobQueue) -> None:
    first = queue.claim("host:1:a", 3)
    second = queue.claim("host:2:b", 3)
    assert len(first) == 3 and len(second) == 2
    assert not {j.job_id for j in first} & {j.job_id for j in second}
    assert [j.job_id for j in first] == sorted(j.job_id for j in first)
    assert queue.claim("host:3:c", 3) == []


def test_claims_of_a_dead_worker_go_back_to_the_queue(queue: JobQueue) -> None:
    claimed = queue.claim(_dead_worker(), 5)
    assert len(claimed) == 5 and queue.queued_count() == 0
    assert queue.requeue_abandoned() == len(claimed)
    assert queue.queued_count() == 5


def test_a_job_that_keeps_killing_workers_is_failed(queue: JobQueue) -> None:
    [job] = queue.claim(_dead_worker(), 1)
    with queue.engine.begin() as conn:
        conn.execute(
            update(AnalysisJob).where(AnalysisJob.id == job.job_id).values(attempts=MAX_ATTEMPTS)
        )
    queue.requeue_abandoned()
    with queue.engine.connect() as conn:
        state = conn.scalar(select(AnalysisJob.state).where(AnalysisJob.id == job.job_id))
    assert state == JobState.FAILED
    assert queue.queued_count() == 4


# --- delivery claims (several senders sharing the index) ---------------------------------


@pytest.fixture
def deliveries(queue: JobQueue) -> DeliveryQueue:
    with queue.engine.begin() as conn:
        uids = list(conn.scalars(select(Instance.sop_instance_uid)))
        enqueue(conn, uids, "PACS")
    return DeliveryQueue(
        queue.engine, retry_initial_seconds=60, retry_max_seconds=600, max_attempts=0
    )


def test_delivery_claims_are_exclusive_until_released(deliveries: DeliveryQueue) -> None:
    first = deliveries.claim(limit=3)
    second = deliveries.claim(limit=3)
    assert len(first) == 3 and len(second) == 2
    assert not {d.delivery_id for d in first} & {d.delivery_id for d in second}
    assert deliveries.claim() == [], "claimed rows are not due for anyone else"
    deliveries.delivered(first[0].delivery_id)
    deliveries.retry_later(first[1], "refused")  # backs off: not released early
    assert deliveries.release(first + second) == 3  # first[2] and both of second
    again = deliveries.claim()
    assert {d.delivery_id for d in again} == {first[2].delivery_id} | {
        d.delivery_id for d in second
    }
