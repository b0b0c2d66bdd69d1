"""The archive stays true: no study moves to another patient unnoticed, a replaced copy is
never half there, a crash leaves nothing the start-up recovery does not clean up, and
`pneumonode verify` finds every disagreement between the index and the files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dicom_data import association, file_bytes
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from node.testing.index import index_connection
from node.testing.node_process import NodeProcess, node_command, node_env, restart_node
from node.testing.samples import DX, second_copy, small_image
from storage.archive import Archive
from storage.consistency import recover, verify
from storage.database import create_index_engine
from storage.errors import IdentityConflictError
from storage.filestore import FileStore
from storage.models import Instance, Patient, Study


def _send(node: NodeProcess, *datasets) -> list:
    with association(node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])]) as a:
        return [a.send_c_store(ds) for ds in datasets]


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        node_command(node.config_path, *args),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _patient_of_study(node: NodeProcess, study_uid: str) -> str:
    with index_connection(node.db_url) as conn:
        return conn.scalar(
            select(Patient.patient_id)
            .join(Study, Study.patient_pk == Patient.id)
            .where(Study.study_instance_uid == study_uid)
        )


# --- patient identity --------------------------------------------------------------------


def test_study_of_another_patient_is_refused_and_counted(node_factory) -> None:
    node = node_factory(name="conflict_refuse")
    first = small_image(patient_id="PAT-A")
    other = small_image(patient_id="PAT-B", study_uid=first.StudyInstanceUID)
    series_moved = small_image(patient_id="PAT-A", series_uid=first.SeriesInstanceUID)
    ok, refused, refused_series = _send(node, first, other, series_moved)
    assert ok.Status == 0x0000
    assert refused.Status == 0xC240
    assert first.StudyInstanceUID in refused.ErrorComment
    assert "PAT-" not in refused.ErrorComment
    assert refused_series.Status == 0xC241
    assert first.SeriesInstanceUID in refused_series.ErrorComment
    assert _patient_of_study(node, first.StudyInstanceUID) == "PAT-A"
    log = node.log_text()
    assert "PAT-A" not in log and "PAT-B" not in log
    assert (
        "identity conflicts (study under another patient, series under another study): "
        "refused 2" in _cli(node, "status").stdout
    )


def test_accepting_conflicts_moves_the_study_and_says_so(node_factory) -> None:
    node = node_factory({"storage": {"identity_conflicts": "accept"}}, name="conflict_accept")
    first = small_image(patient_id="PAT-A")
    other = small_image(patient_id="PAT-B", study_uid=first.StudyInstanceUID)
    assert [s.Status for s in _send(node, first, other)] == [0x0000, 0x0000]
    assert _patient_of_study(node, first.StudyInstanceUID) == "PAT-B"
    assert f"although study {first.StudyInstanceUID} is held under another patient" in (
        node.log_text()
    )
    assert "accepted 1" in _cli(node, "status").stdout


# --- replace and crashes, on the archive itself ----------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield Archive(FileStore(tmp_path, fsync=False), engine)
    engine.dispose()


def _row(archive: Archive, sop: str):
    with archive.engine.connect() as conn:
        return conn.execute(select(Instance).where(Instance.sop_instance_uid == sop)).first()


def test_replace_writes_a_new_file_and_switches_the_row(archive: Archive) -> None:
    first = small_image(series_description="first")
    second = second_copy(first, "second copy, longer")
    archive.store_file_bytes(file_bytes(first))
    old_path = _row(archive, first.SOPInstanceUID).file_path
    archive.store_file_bytes(file_bytes(second))
    row = _row(archive, first.SOPInstanceUID)
    assert row.file_path != old_path
    assert not archive.path_of(old_path).exists()
    stored = archive.path_of(row.file_path)
    assert stored.stat().st_size == row.file_size
    assert dcmread(stored).SeriesDescription == "second copy, longer"
    assert verify(archive.files, archive.engine).problems == 0


def test_a_failed_index_commit_leaves_the_old_copy_whole(archive: Archive, monkeypatch) -> None:
    first = small_image(series_description="first")
    second = second_copy(first, "second")
    archive.store_file_bytes(file_bytes(first))
    before = _row(archive, first.SOPInstanceUID)

    def crash(*_args, **_kwargs):
        raise OSError("disk gone mid-commit")

    monkeypatch.setattr(archive, "_index", crash)
    with pytest.raises(OSError):
        archive.store_file_bytes(file_bytes(second))
    after = _row(archive, first.SOPInstanceUID)
    assert after.file_path == before.file_path
    assert dcmread(archive.path_of(after.file_path)).SeriesDescription == "first"
    assert verify(archive.files, archive.engine).problems == 0


def test_conflict_refusal_leaves_no_file(archive: Archive) -> None:
    first = small_image(patient_id="PAT-A")
    archive.store_file_bytes(file_bytes(first))
    other = small_image(patient_id="PAT-B", study_uid=first.StudyInstanceUID)
    with pytest.raises(IdentityConflictError):
        archive.store_file_bytes(file_bytes(other))
    assert _row(archive, other.SOPInstanceUID) is None
    assert not any(other.SOPInstanceUID in p for p, _ in archive.files.walk())


def test_recovery_sets_orphans_aside_and_reports_missing_files(archive: Archive) -> None:
    kept = small_image()
    lost = small_image()
    archive.store_file_bytes(file_bytes(kept))
    archive.store_file_bytes(file_bytes(lost))
    orphan = archive.files.absolute("1.2.3/4.5.6/7.8.9.dcm")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(file_bytes(small_image()))
    temporary = archive.files.absolute("1.2.3/.incoming-x.tmp")
    temporary.write_bytes(b"half")
    archive.path_of(_row(archive, lost.SOPInstanceUID).file_path).unlink()

    archive.files.release_writer_lock()  # as the crashed writer's lock went with it
    report = recover(FileStore(archive.files.root, fsync=False), archive.engine)
    assert report.temporaries_removed == 1
    assert report.orphans == ["1.2.3/4.5.6/7.8.9.dcm"]
    assert [sop for sop, _ in report.missing] == [lost.SOPInstanceUID]
    assert not orphan.exists() and not temporary.exists()
    assert (archive.files.root / "quarantine" / "1.2.3/4.5.6/7.8.9.dcm").is_file()


def test_recovery_waits_for_other_writers(archive: Archive) -> None:
    archive.store_file_bytes(file_bytes(small_image()))  # this process now holds the lock
    orphan = archive.files.absolute("1.2.3/4.5.6/7.8.9.dcm")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"being indexed by another process")
    report = recover(FileStore(archive.files.root), archive.engine)
    assert report.skipped and orphan.exists()


# --- the node and `pneumonode verify` ------------------------------------------------------


def test_verify_and_restart_recovery_on_a_real_node(node_factory) -> None:
    node = node_factory(name="verify")
    images = [small_image() for _ in range(4)]
    assert all(s.Status == 0 for s in _send(node, *images))
    assert _cli(node, "verify").returncode == 0
    with index_connection(node.db_url) as conn:
        paths = dict(conn.execute(select(Instance.sop_instance_uid, Instance.file_path)).all())
    files = node.storage / "files"
    # Same size, other bytes: only the checksum can tell.
    flipped = files / paths[images[0].SOPInstanceUID]
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = files / paths[images[1].SOPInstanceUID]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    (files / paths[images[2].SOPInstanceUID]).unlink()
    orphan = files / "1.2.3" / "4.5" / "6.7.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(file_bytes(small_image()))

    result = _cli(node, "verify")
    assert result.returncode == 1
    out = result.stdout
    assert f"checksum differs: {images[0].SOPInstanceUID}" in out
    assert f"size differs: {images[1].SOPInstanceUID}" in out
    assert f"missing file: {images[2].SOPInstanceUID}" in out
    assert "file not in the index: 1.2.3/4.5/6.7.dcm" in out
    assert "4 indexed instances checked: 4 problems" in out

    assert node.stop() == 0
    again = restart_node(node)
    log = again.log_text()
    assert "moved 1 files that no index row points to" in log
    assert (
        f"1 indexed instances have no file (run `pneumonode verify`), e.g. SOP "
        f"{images[2].SOPInstanceUID}" in log
    )
    assert not orphan.exists()
    assert (node.storage / "quarantine" / "1.2.3" / "4.5" / "6.7.dcm").is_file()
    assert again.stop() == 0


def test_an_index_from_before_checksums_gains_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_index_engine(url)
    archive = Archive(FileStore(tmp_path, fsync=False), engine)
    archive.store_file_bytes(file_bytes(small_image()))
    with engine.begin() as conn:  # as a release before checksums (and schema versions) left it
        conn.exec_driver_sql("ALTER TABLE instance DROP COLUMN file_sha256")
        conn.exec_driver_sql("DROP TABLE alembic_version")
        conn.exec_driver_sql("DROP TABLE job_result")  # results were columns of the job then
        for kind in ("sc", "sr"):
            conn.exec_driver_sql(
                f"ALTER TABLE analysis_job ADD COLUMN {kind}_sop_instance_uid"
                " VARCHAR(64) NOT NULL DEFAULT ''"
            )
    engine.dispose()
    engine = create_index_engine(url)  # as a newer node opening an older index
    try:
        report = verify(FileStore(tmp_path, fsync=False), engine)
        assert report.problems == 0 and report.without_checksum == 1
        assert "1 rows predate checksums" in report.lines()[-1]
    finally:
        engine.dispose()


def test_verify_beside_a_running_node_counts_writes_under_way_not_problems(
    tmp_path: Path,
) -> None:
    """While another process holds the writer lock, a temporary file is a write under way
    and a file whose row commits a moment later is no orphan; without a writer, both are."""
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    files = FileStore(tmp_path, fsync=False)
    archive = Archive(files, engine)
    archive.store_file_bytes(file_bytes(small_image()))
    stored = next(relative for relative, _ in files.walk())
    temporary = files.absolute(stored).parent / ".incoming-under-way.tmp"
    temporary.write_bytes(b"half")
    files.release_writer_lock()  # this process writes no more
    try:
        with FileStore(tmp_path, fsync=False).writer_lock(exclusive=False):  # a node writing
            live = verify(files, engine)
        assert live.problems == 0 and live.in_progress == 1
        assert "1 writes under way by a running node" in live.lines()[-1]
        alone = verify(files, engine)
        assert alone.problems == 1 and alone.temporaries
    finally:
        engine.dispose()


def test_folder_entries_are_synced_once_per_process_before_the_first_success(
    tmp_path: Path, monkeypatch
) -> None:
    """Each file's folder is synced for its new name; the entries of a new series (in its
    study folder) and of a new study (in files/) once per process, including when another
    process made the folder and may not have synced its parent yet."""
    synced: list[str] = []
    monkeypatch.setattr(
        FileStore, "_fsync_dir", staticmethod(lambda folder: synced.append(folder.name))
    )

    def write(store: FileStore, relative: str) -> list[str]:
        synced.clear()
        store.write_new(relative, b"data")
        return list(synced)

    first = FileStore(tmp_path)
    assert write(first, "1.2/1.2.3/1.2.3.4.dcm") == ["1.2.3", "1.2", "files"]
    assert write(first, "1.2/1.2.3/1.2.3.5.dcm") == ["1.2.3"]
    assert write(first, "1.2/1.2.4/1.2.4.1.dcm") == ["1.2.4", "1.2"]  # the study is known
    other_process = FileStore(tmp_path)
    assert write(other_process, "1.2/1.2.3/1.2.3.6.dcm") == ["1.2.3", "1.2", "files"]
    assert write(other_process, "1.2/1.2.3/1.2.3.7.dcm") == ["1.2.3"]
    shutil.rmtree(tmp_path / "files" / "1.2")  # removed by hand: made again, synced again
    assert write(first, "1.2/1.2.3/1.2.3.8.dcm") == ["1.2.3", "1.2", "files"]


# --- both ways of adding rows: one INSERT ... ON CONFLICT DO NOTHING, or a look first --------


@pytest.mark.parametrize("one_statement", [True, False], ids=["on-conflict", "look-first"])
def test_rows_are_added_once_and_updated_either_way(
    tmp_path: Path, monkeypatch, one_statement: bool
) -> None:
    """SQLite 3.35+ and PostgreSQL add a row in one statement; a database that cannot
    (an older SQLite) looks first. Both give the same index: one patient, study, series and
    job per key, a replaced copy updated in place, a conflicting study still refused."""
    from node.eligibility import Eligibility
    from storage import archive as archive_module
    from storage import indexer
    from storage.models import AnalysisJob, Series

    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    one_form = indexer.insert_if_absent(engine.dialect, Patient.__table__, "patient_id")
    assert one_form is not None, "this SQLite has no one-statement form: nothing to compare"
    if not one_statement:
        for module in (indexer, archive_module):
            monkeypatch.setattr(module, "insert_if_absent", lambda *_args: None)
    store = Archive(
        FileStore(tmp_path, fsync=False),
        engine,
        decide_job=Eligibility(["CR", "DX"], ["CHEST", ""]),
    )
    first = small_image(patient_id="PAT-A", series_description="first")
    store.store_file_bytes(file_bytes(first))
    sibling = small_image(patient_id="PAT-A", study_uid=first.StudyInstanceUID)
    store.store_file_bytes(file_bytes(sibling))
    store.store_file_bytes(file_bytes(second_copy(first, "second copy")))
    with pytest.raises(IdentityConflictError):
        store.store_file_bytes(
            file_bytes(small_image(patient_id="PAT-B", study_uid=first.StudyInstanceUID))
        )
    with engine.connect() as conn:
        counts = {
            model.__name__: len(conn.execute(select(model)).all())
            for model in (Patient, Study, Series, Instance, AnalysisJob)
        }
        series_description = conn.scalar(
            select(Series.series_description).where(
                Series.series_instance_uid == first.SeriesInstanceUID
            )
        )
    assert counts == {"Patient": 1, "Study": 1, "Series": 2, "Instance": 2, "AnalysisJob": 2}
    assert series_description == "second copy"
    assert verify(store.files, engine).problems == 0
    engine.dispose()
