"""Nudges between processes (node.nudges) and the worker's batch that does not wait for
jobs that are not coming (AnalysisWorker._claim_batch)."""

from __future__ import annotations

import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from dicom_data import file_bytes

from node.nudges import NudgeListener, nudge, nudge_address
from node.process.worker import AnalysisWorker
from node.testing.samples import small_image
from storage.archive import Archive
from storage.database import create_index_engine
from storage.filestore import FileStore
from storage.jobs import JobQueue
from storage.models import JobState

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="nudges use Linux's abstract sockets"
)

# Far longer than any nudge takes: waits that end sooner were ended by the nudge.
LONG_WAIT_S = 60.0


@pytest.fixture
def listener(tmp_path: Path):
    listener = NudgeListener(nudge_address(tmp_path, "test"))
    yield listener
    listener.close()


def test_a_nudge_from_another_process_ends_the_wait(listener, tmp_path: Path) -> None:
    assert listener.listening
    sender = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from node.nudges import nudge, nudge_address;"
            " nudge(nudge_address(sys.argv[1], 'test'))",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    assert listener.wait(LONG_WAIT_S) is True
    assert sender.wait(30) == 0


def test_many_nudges_make_one_round(listener, tmp_path: Path) -> None:
    address = nudge_address(tmp_path, "test")
    for _ in range(50):
        nudge(address)
    assert listener.wait(LONG_WAIT_S) is True
    assert listener.wait(0) is False  # all 50 consumed by the first wait


def test_no_listener_no_error(tmp_path: Path) -> None:
    nudge(nudge_address(tmp_path / "nobody listens", "test"))
    nudge(None)


def test_only_one_listener_per_folder_and_purpose(listener, tmp_path: Path) -> None:
    second = NudgeListener(nudge_address(tmp_path, "test"))
    try:
        assert not second.listening
        assert second.wait(0) is False  # it still waits out its timeout: polling only
        other_purpose = NudgeListener(nudge_address(tmp_path, "other"))
        assert other_purpose.listening
        other_purpose.close()
    finally:
        second.close()


def test_folders_do_not_nudge_each_other(listener, tmp_path: Path) -> None:
    elsewhere = tmp_path / "another storage folder"
    elsewhere.mkdir()
    nudge(nudge_address(elsewhere, "test"))
    assert listener.wait(0) is False


def test_interrupt_ends_the_wait_from_this_process(listener) -> None:
    threading.Timer(0.05, listener.interrupt).start()
    assert listener.wait(LONG_WAIT_S) is True


# --- the worker's batch ---------------------------------------------------------------------


class CountingQueue(JobQueue):
    """The real job queue, counting how often the worker looks at it."""

    looks = 0

    def queued_count(self) -> int:
        self.looks += 1
        return super().queued_count()


def _queued_jobs(tmp_path: Path, count: int) -> CountingQueue:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    archive = Archive(
        FileStore(tmp_path, fsync=False),
        engine,
        decide_job=lambda _record, _is_result: (JobState.QUEUED, ""),
    )
    for _ in range(count):
        archive.store_file_bytes(file_bytes(small_image()))
    return CountingQueue(engine)


def _worker(jobs: JobQueue, batch_size: int) -> types.SimpleNamespace:
    """What _claim_batch reads of a worker (the model is not needed to claim)."""
    return types.SimpleNamespace(
        settings=types.SimpleNamespace(batch_size=batch_size, max_wait_seconds=LONG_WAIT_S),
        jobs=jobs,
        _stop=threading.Event(),
        identity="test-worker",
    )


def test_a_batch_that_stopped_growing_is_claimed_without_waiting_out_max_wait(
    tmp_path: Path,
) -> None:
    jobs = _queued_jobs(tmp_path, 3)
    claimed = AnalysisWorker._claim_batch(_worker(jobs, batch_size=16))
    assert len(claimed) == 3
    assert jobs.looks == 2  # the first look, and one that found nothing new


def test_a_full_batch_is_claimed_at_once(tmp_path: Path) -> None:
    jobs = _queued_jobs(tmp_path, 5)
    claimed = AnalysisWorker._claim_batch(_worker(jobs, batch_size=4))
    assert len(claimed) == 4
    assert jobs.looks == 1
