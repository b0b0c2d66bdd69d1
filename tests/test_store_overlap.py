"""The archive writes a new instance's file while it indexes it, and commits only after.

Archive.store_file_bytes overlaps the file's write and syncs (on a file-writer thread) with
building the index record and running the index statements. These tests hold the file
write at will to check that the order a crash or a reader can see is unchanged: no row is
visible before its file is durable under the name the row gives, a failed write leaves
neither, and a copy that took the name meanwhile is indexed where it went.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from dicom_data import file_bytes
from sqlalchemy import select

from node.testing.samples import second_copy, small_image
from storage.archive import Archive
from storage.consistency import verify
from storage.database import create_index_engine
from storage.errors import IdentityConflictError
from storage.filestore import FileStore
from storage.models import AnalysisJob, Instance, JobState

WAIT_S = 30


class HeldFileStore(FileStore):
    """A FileStore whose writes wait until released, and can be made to fail or to find
    their name taken by another copy first."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=True)
        self.started = threading.Event()
        self.release = threading.Event()
        self.failure: OSError | None = None
        self.taken_by: bytes | None = None

    def write_new(self, relative: str, data: bytes | memoryview) -> str:
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the write"
        if self.failure is not None:
            raise self.failure
        if self.taken_by is not None:  # another store of the same instance came first
            super().write_new(relative, self.taken_by)
        return super().write_new(relative, data)


@pytest.fixture
def held(tmp_path: Path):
    files = HeldFileStore(tmp_path)
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    archive = Archive(
        files, engine, decide_job=lambda _record, _is_result: (JobState.QUEUED, "")
    )
    yield archive, files
    files.release.set()
    engine.dispose()


def _rows(archive: Archive) -> list[Instance]:
    with archive.engine.connect() as conn:
        return list(conn.execute(select(Instance)).all())


def _jobs(archive: Archive) -> int:
    with archive.engine.connect() as conn:
        return len(conn.execute(select(AnalysisJob.id)).all())


def _store_in_thread(archive: Archive, data: bytes) -> tuple[threading.Thread, list]:
    outcome: list = []

    def store() -> None:
        try:
            outcome.append(archive.store_file_bytes(data, calling_ae="SENDER"))
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=store)
    thread.start()
    return thread, outcome


def test_the_row_commits_only_after_its_file_is_written(held) -> None:
    archive, files = held
    image = small_image()
    thread, outcome = _store_in_thread(archive, file_bytes(image))
    assert files.started.wait(WAIT_S)
    # The index statements have run meanwhile, but nothing is committed: no reader (C-FIND,
    # C-MOVE, the analysis worker) sees an instance whose file is not there yet.
    thread.join(0.5)
    assert thread.is_alive()
    assert _rows(archive) == []
    assert _jobs(archive) == 0
    assert list(files.walk()) == []
    files.release.set()
    thread.join(WAIT_S)
    assert outcome[0].action == "stored"
    (row,) = _rows(archive)
    assert row.sop_instance_uid == image.SOPInstanceUID
    assert files.absolute(row.file_path).read_bytes() == file_bytes(image)
    assert _jobs(archive) == 1
    assert verify(files, archive.engine).problems == 0


def test_a_failed_write_leaves_neither_row_nor_file(held) -> None:
    archive, files = held
    files.failure = OSError(28, "No space left on device")
    files.release.set()
    with pytest.raises(OSError, match="No space left"):
        archive.store_file_bytes(file_bytes(small_image()))
    assert _rows(archive) == []
    assert _jobs(archive) == 0
    assert list(files.walk()) == []


def test_a_failed_write_fails_only_its_own_store(held) -> None:
    """Stores waiting together are committed together; one failed write is refused alone."""
    archive, files = held
    good, bad = small_image(), small_image()
    failing = file_bytes(bad)
    original = HeldFileStore.write_new

    def write_new(self, relative: str, data: bytes | memoryview) -> str:
        if bytes(data) == failing:
            self.release.wait(WAIT_S)
            raise OSError(5, "Input/output error")
        return original(self, relative, data)

    HeldFileStore.write_new = write_new  # type: ignore[method-assign]
    try:
        threads = [_store_in_thread(archive, file_bytes(image)) for image in (good, bad)]
        files.release.set()
        for thread, _ in threads:
            thread.join(WAIT_S)
    finally:
        HeldFileStore.write_new = original  # type: ignore[method-assign]
    (stored, _), (refused, _) = ((o[0], t) for t, o in threads)
    assert stored.action == "stored"
    assert isinstance(refused, OSError)
    assert [row.sop_instance_uid for row in _rows(archive)] == [good.SOPInstanceUID]
    assert verify(files, archive.engine).problems == 0


def test_a_copy_that_took_the_name_meanwhile_is_replaced_where_it_went(held) -> None:
    archive, files = held
    first = small_image(series_description="first")
    second = second_copy(first, "second, sent while the first was being written")
    files.taken_by = file_bytes(first)
    files.release.set()
    outcome = archive.store_file_bytes(file_bytes(second))
    (row,) = _rows(archive)
    assert row.file_path == outcome.relative_path
    assert row.file_path != files.relative_path(
        first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
    )
    assert files.absolute(row.file_path).read_bytes() == file_bytes(second)
    # The first copy's file has no row: `verify` names it, the recovery pass sets it aside.
    assert len(verify(files, archive.engine).orphans) == 1


def test_a_refused_identity_conflict_removes_the_file_written_meanwhile(held) -> None:
    archive, files = held
    files.release.set()
    first = small_image(patient_id="PAT-A")
    archive.store_file_bytes(file_bytes(first))
    other = small_image(patient_id="PAT-B", study_uid=first.StudyInstanceUID)
    with pytest.raises(IdentityConflictError):
        archive.store_file_bytes(file_bytes(other))
    assert [row.sop_instance_uid for row in _rows(archive)] == [first.SOPInstanceUID]
    assert not any(other.SOPInstanceUID in path for path, _ in files.walk())
