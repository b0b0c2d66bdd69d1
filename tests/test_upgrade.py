"""Indexes survive upgrades: an index carries its schema version, and opening it runs the
numbered migrations of storage/migrations once, under a lock, or refuses it unchanged.

The previous release's storage folder (tests/fixtures/previous_release, made by that
release's own code with make_fixture.py) opens with the current node: C-FIND finds every
instance, `verify` passes, `status` counts what that release counted, and its pending
analysis and deliveries carry on to a dcmtk storescp.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from analysis_support import analysing_and_delivering, wait_for
from pydicom import Dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import Engine, inspect, select, text

from node.testing.config_files import write_config
from node.testing.dcmtk import StoreSCP
from node.testing.index import delivery_counts, index_connection, job_counts
from node.testing.node_process import NodeProcess, c_find, node_command, node_env, wait_for_log
from storage.database import create_index_engine
from storage.migrations import IndexVersionError, schema
from storage.models import Base, Instance, Patient, Study
from storage.text import fold_case

FIXTURE = Path(__file__).parent / "fixtures" / "previous_release"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text(encoding="utf-8"))
HEAD = schema.heads()[0]
MIGRATIONS = schema.SCRIPT_LOCATION
DESTINATION = "STORESCP"
FUTURE_VERSION = "9999_from_a_newer_pneumonode"


def copy_previous_release(workdir: Path) -> Path:
    """The fixture's storage folder (index and files) copied to `workdir`/storage."""
    storage = workdir / "storage"
    shutil.copytree(FIXTURE / "storage", storage)
    return storage


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        node_command(config, *args),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_lines_in_order(expected: list[str], output: str) -> None:
    """Each expected line appears in `output`, in the same order (others may come between)."""
    lines = iter(output.splitlines())
    for line in expected:
        assert any(line == candidate for candidate in lines), f"{line!r} not in:\n{output}"


def versions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT version_num FROM alembic_version")))


def schema_differences(engine: Engine) -> list:
    """What Alembic finds between the index and storage/models.py (nothing, at head)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def find(node: NodeProcess, model: str, keys: dict[str, str]) -> list[Dataset]:
    final, matches = c_find(node, model, keys, calling="UPGRADETEST")
    assert final == 0x0000
    return matches


def every_instance_found(node: NodeProcess) -> set[str]:
    keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "", "SeriesInstanceUID": ""}
    answers = find(node, StudyRootQueryRetrieveInformationModelFind, keys | {"SOPInstanceUID": ""})
    return {str(answer.SOPInstanceUID) for answer in answers}


def indexed_uids(node: NodeProcess) -> set[str]:
    with index_connection(node.db_url) as conn:
        return set(conn.scalars(select(Instance.sop_instance_uid)))


@pytest.mark.slow  # runs the CLI
def test_previous_release_status_and_verify_read_the_same(tmp_path: Path) -> None:
    storage = copy_previous_release(tmp_path)
    config = write_config(
        tmp_path / "config.toml",
        {"storage": {"folder": str(storage)}, "analysis": {"enabled": False}, "peers": []},
    )
    status = run_cli(config, "status")
    assert status.returncode == 0, status.stderr
    assert "index schema upgraded from an index from before schema versions" in status.stderr
    previous = (FIXTURE / "status.txt").read_text(encoding="utf-8").splitlines()
    assert previous[0] == "instances: 18 (10 results made by this node)"
    assert_lines_in_order(previous, status.stdout)

    verify = run_cli(config, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert_lines_in_order((FIXTURE / "verify.txt").read_text().splitlines(), verify.stdout)
    assert "index schema" not in verify.stderr  # at head already: nothing to do

    engine = create_index_engine(f"sqlite:///{storage / 'index.sqlite'}")
    try:
        assert versions(engine) == [HEAD]
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


def test_previous_release_node_finds_everything_and_carries_on(
    tmp_path: Path, node_factory, tiny_model: Path
) -> None:
    """Its queued jobs are analysed, its pending deliveries arrive, its failed ones arrive
    after `retry`, and C-FIND finds what it held and what was made since."""
    copy_previous_release(tmp_path / "node")
    scp = StoreSCP(tmp_path / "received")
    scp.start()
    try:
        node = node_factory(
            analysing_and_delivering(tiny_model, DESTINATION, scp.port),
            name="node",
        )
        wait_for_log(node, "index schema upgraded from an index from before schema versions")
        held = set(MANIFEST["instances"]) | set(MANIFEST["results"])
        assert held <= every_instance_found(node)
        patients = find(
            node,
            PatientRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "PATIENT", "PatientID": "", "NumberOfPatientRelatedStudies": ""},
        )
        assert {str(p.PatientID): int(p.NumberOfPatientRelatedStudies) for p in patients} == {
            "P1": 1,
            "P2": 2,
            "P3": 1,
        }

        queued = MANIFEST["jobs"]["queued"]
        done = MANIFEST["jobs"]["done"] + queued
        wait_for(lambda: job_counts(node).get("done", 0) == done, 180, "the queued jobs")
        pending_and_new = MANIFEST["deliveries"]["pending"] + 2 * queued
        delivered = MANIFEST["deliveries"]["delivered"] + pending_and_new
        wait_for(
            lambda: delivery_counts(node).get("delivered", 0) == delivered,
            120,
            "the pending and the new deliveries",
        )
        assert sum(scp.received_uids().values()) == pending_and_new
        retry = run_cli(node.config_path, "retry")
        assert retry.returncode == 0, retry.stderr
        assert "0 failed analysis jobs and 2 failed deliveries" in retry.stdout
        everything = delivered + MANIFEST["deliveries"]["failed"]
        wait_for(
            lambda: delivery_counts(node) == {"delivered": everything},
            120,
            "the failed deliveries, requeued",
        )
        received = scp.received_uids()
        assert set(received.values()) == {1}, f"delivered more than once: {received}"
        assert len(received) == everything - MANIFEST["deliveries"]["delivered"]
        assert job_counts(node) == {"done": done, "skipped": MANIFEST["jobs"]["skipped"]}

        indexed = indexed_uids(node)
        assert len(indexed) == len(held) + 2 * queued
        assert every_instance_found(node) == indexed
        assert node.stop() == 0
    finally:
        scp.stop()
    verify = run_cli(node.config_path, "verify")
    assert verify.returncode == 0, verify.stdout
    assert f"{len(indexed)} indexed instances checked: 0 problems" in verify.stdout


@pytest.mark.slow  # runs the CLI
def test_an_index_newer_than_the_code_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    index = storage / "index.sqlite"
    url = f"sqlite:///{index}"
    engine = create_index_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": FUTURE_VERSION})
    engine.dispose()
    before = index.read_bytes()
    message = (
        f"pneumonode: the index at {url} has schema version {FUTURE_VERSION}, newer than "
        f"this pneumonode knows (up to {HEAD}): upgrade pneumonode"
    )

    with pytest.raises(IndexVersionError) as refused:
        create_index_engine(url)
    assert refused.value.version == FUTURE_VERSION
    config = write_config(
        tmp_path / "config.toml",
        {
            "node": {"bind_address": "127.0.0.1", "port": 0, "processes": 1},
            "storage": {"folder": str(storage)},
            "analysis": {"enabled": False},
        },
    )
    for command in ("status", "verify", "serve"):
        result = run_cli(config, command)
        assert result.returncode == 4, (command, result.stdout, result.stderr)
        assert result.stderr.splitlines()[-1] == message, result.stderr
        assert result.stderr.count("schema version") == 1, result.stderr
    assert index.read_bytes() == before


def test_a_fresh_sqlite_index_is_made_at_head(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        assert versions(engine) == [HEAD]
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


def test_a_fresh_postgres_index_is_made_at_head(postgres_url: str) -> None:
    engine = create_index_engine(postgres_url)
    try:
        assert versions(engine) == [HEAD]
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


OPEN_AT = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from storage.database import create_index_engine
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
create_index_engine(sys.argv[1]).dispose()
"""


def open_at_once(url: str, processes: int = 3) -> list[subprocess.CompletedProcess]:
    """`processes` processes that open the index at the same instant, once all have
    imported what they need."""
    start_at = str(time.time() + 8)
    running = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT, url, start_at],
            env=node_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for process in running:
        stdout, stderr = process.communicate(timeout=120)
        code = process.returncode
        results.append(subprocess.CompletedProcess(process.args, code, stdout, stderr))
    return results


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_processes_opening_a_fresh_index_at_once_all_succeed(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    results = open_at_once(url)
    assert [r.returncode for r in results] == [0] * len(results), [r.stderr for r in results]
    logs = "".join(r.stderr for r in results)
    assert logs.count(f"index schema upgraded from an empty database to {HEAD}") == 1, logs
    engine = create_index_engine(url)
    try:
        assert versions(engine) == [HEAD]
    finally:
        engine.dispose()


def _first_release(conn: sqlite3.Connection) -> None:
    """What the first release's index lacks (ae7dcae): tables, columns, their indexes."""
    conn.executescript(
        """
        DROP TABLE instance_attribute;
        DROP TABLE identity_conflict;
        DROP INDEX ix_instance_acquisition_date_time;
        DROP INDEX ix_patient_patient_name_folded;
        DROP INDEX ix_study_referring_physician_name_folded;
        ALTER TABLE instance DROP COLUMN acquisition_date_time;
        ALTER TABLE instance DROP COLUMN file_sha256;
        ALTER TABLE patient DROP COLUMN patient_name_folded;
        ALTER TABLE study DROP COLUMN referring_physician_name_folded;
        """
    )


def _three_attribute_indexes(conn: sqlite3.Connection) -> None:
    """The instance_attribute indexes of ab863fc, which 5b7d822 replaced by one."""
    conn.executescript(
        """
        DROP INDEX ix_instance_attribute_instance_tag;
        CREATE INDEX ix_instance_attribute_instance_pk ON instance_attribute (instance_pk);
        CREATE INDEX ix_instance_attribute_tag_value ON instance_attribute (tag, value);
        CREATE INDEX ix_instance_attribute_tag_folded ON instance_attribute (tag, folded);
        """
    )


@pytest.mark.parametrize("earlier", [_first_release, _three_attribute_indexes])
def test_indexes_of_earlier_releases_are_completed_to_the_baseline(
    tmp_path: Path, earlier
) -> None:
    index = copy_previous_release(tmp_path) / "index.sqlite"
    with sqlite3.connect(index) as conn:
        earlier(conn)
    fresh = create_index_engine(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    engine = create_index_engine(f"sqlite:///{index}")
    try:
        assert versions(engine) == [HEAD]
        assert schema_differences(engine) == []
        for table in Base.metadata.tables:
            names = {i["name"] for i in inspect(engine).get_indexes(table)}
            assert names == {i["name"] for i in inspect(fresh).get_indexes(table)}, table
        with engine.connect() as conn:
            names = conn.execute(select(Patient.patient_name, Patient.patient_name_folded))
            for name, folded in names:
                assert folded == fold_case(name)
            for name, folded in conn.execute(
                select(Study.referring_physician_name, Study.referring_physician_name_folded)
            ):
                assert folded == fold_case(name)
            count = conn.scalar(select(Instance.id).where(Instance.acquisition_date_time.is_(None)))
            assert count is None
    finally:
        engine.dispose()
        fresh.dispose()


NEXT_MIGRATION = '''
"""A probe of a later migration: a table that others point at is copied (SQLite batch
mode), after 0002_result_kinds has moved the SC and SR columns into job_result rows."""

import sqlalchemy as sa
from alembic import op

revision = "0003_probe"
down_revision = "0002_result_kinds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", recreate="always") as batch:
        batch.alter_column("photometric_interpretation", type_=sa.String(32))


def downgrade() -> None:
    raise NotImplementedError("a probe")
'''


def _migrations_copy(tmp_path: Path, name: str, without: tuple[str, ...] = ()) -> Path:
    """This code's migrations (not a patched location's), less the files `without` names."""
    location = tmp_path / name
    ignored = shutil.ignore_patterns("__pycache__", *without)
    shutil.copytree(MIGRATIONS, location, ignore=ignored)
    return location


def test_a_versioned_index_is_upgraded_by_the_next_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index at 0001_baseline runs the migrations after it, data moves included, in one
    transaction: each done job's SC and SR become two job_result rows, and foreign keys stay
    whole when SQLite copies a table others point at."""
    index = copy_previous_release(tmp_path) / "index.sqlite"
    url = f"sqlite:///{index}"
    monkeypatch.setattr(
        schema, "SCRIPT_LOCATION", _migrations_copy(tmp_path, "at_baseline", ("0002_*",))
    )
    engine = create_index_engine(url)  # completed to 0001_baseline, as that code left it
    try:
        assert versions(engine) == ["0001_baseline"]
        with engine.connect() as conn:
            done = conn.scalar(text(
                "SELECT count(*) FROM analysis_job WHERE state = 'done'"
                " AND sc_sop_instance_uid != '' AND sr_sop_instance_uid != ''"
            ))
        assert done == MANIFEST["jobs"]["done"]
    finally:
        engine.dispose()
    location = _migrations_copy(tmp_path, "next")
    (location / "versions" / "0003_probe.py").write_text(NEXT_MIGRATION)
    monkeypatch.setattr(schema, "SCRIPT_LOCATION", location)

    engine = create_index_engine(url)
    try:
        assert versions(engine) == ["0003_probe"]
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT kind, state, count(*) FROM job_result GROUP BY kind, state")
            )
            stored = {("sc", "stored"): done, ("sr", "stored"): done}
            assert {(k, s): n for k, s, n in rows} == stored
            columns = {c["name"] for c in inspect(conn).get_columns("analysis_job")}
            assert "sc_sop_instance_uid" not in columns
            assert conn.scalar(text("SELECT count(*) FROM instance")) == 18
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    finally:
        engine.dispose()
    monkeypatch.undo()
    with pytest.raises(IndexVersionError, match="schema version 0003_probe, newer"):
        create_index_engine(url)
