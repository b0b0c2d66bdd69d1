"""storage/driver_statements.py: the statements that index a new instance, run on the
driver's cursor, write the rows SQLAlchemy's own execution writes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from node.testing.samples import small_image
from storage import indexer
from storage.database import create_index_engine
from storage.driver_statements import DriverStatement, driver_statement
from storage.indexer import HeaderRecord, IndexWriter, insert_if_absent
from storage.models import Instance, InstanceAttribute, Patient, Series, Study

TABLES = (Patient, Study, Series, Instance, InstanceAttribute)


def _records() -> list[HeaderRecord]:
    records = []
    for number in range(6):
        ds = small_image(rows=8, columns=8)
        ds.PatientID = f"P{number % 2}"  # patients shared: the conflict path is taken too
        ds.PatientName = f"DOE^{number}"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientAge = "042Y"
        records.append(HeaderRecord.from_dataset(ds, "1.2.840.10008.1.2.1"))
    return records


def _index(url: str, records: list[HeaderRecord]) -> dict[str, list[tuple]]:
    engine = create_index_engine(url)
    writer = IndexWriter()
    when = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=UTC)
    try:
        for number, record in enumerate(records * 2):  # then each again: the updates
            with engine.begin() as conn:
                writer.upsert(
                    conn,
                    record,
                    file_path=f"f/{number}.dcm",
                    file_size=number,
                    received_at=when,
                    calling_ae="SENDER",
                    is_result=bool(number % 2),
                    file_sha256="ab" * 32,
                )
            writer.committed()
        with engine.connect() as conn:
            return {
                model.__tablename__: [
                    tuple(row) for row in conn.execute(select(model.__table__).order_by("id"))
                ]
                for model in TABLES
            }
    finally:
        engine.dispose()


def test_the_driver_writes_the_rows_sqlalchemy_writes(tmp_path, monkeypatch) -> None:
    records = _records()
    ran: list[str] = []
    for method in ("first", "execute_many"):
        original = getattr(DriverStatement, method)
        monkeypatch.setattr(
            DriverStatement,
            method,
            lambda self, *args, _run=original, _name=method: ran.append(_name) or _run(self, *args),
        )
    on_driver = _index(f"sqlite:///{tmp_path}/driver.sqlite", records)
    assert ran.count("execute_many") == 12 and ran.count("first") >= 6 * 4  # 6 new, 6 again
    monkeypatch.setattr(indexer, "driver_statement", lambda *_args: None)
    through_sqlalchemy = _index(f"sqlite:///{tmp_path}/sqlalchemy.sqlite", records)
    assert on_driver == through_sqlalchemy
    assert len(on_driver["instance"]) == 6 and on_driver["instance_attribute"]


def test_the_hot_statements_take_the_driver_on_sqlite_only() -> None:
    patient_columns = tuple(c.key for c in Patient.__table__.columns if c.key != "id")
    lite = sqlite.dialect()
    statement = insert_if_absent(lite, Patient.__table__, "patient_id")
    taken = driver_statement(statement, lite, patient_columns)
    assert (
        taken is not None
        and taken.names == patient_columns
        and taken.sql.count("?") == len(patient_columns)
    )
    attributes = driver_statement(indexer._INSERT_ATTRIBUTE, lite, indexer._ATTRIBUTE_COLUMNS)
    assert attributes is not None
    server = postgresql.psycopg.dialect()
    on_server = insert_if_absent(server, Patient.__table__, "patient_id")
    assert driver_statement(on_server, server, patient_columns) is None


@pytest.mark.parametrize("left_out", ["patient_name", "received_at"])
def test_a_statement_that_needs_a_column_default_stays_with_sqlalchemy(left_out: str) -> None:
    """Left out, a column with a Python-side default is SQLAlchemy's to fill in."""
    table = Patient.__table__ if left_out == "patient_name" else Instance.__table__
    key = "patient_id" if left_out == "patient_name" else "sop_instance_uid"
    columns = [c.key for c in table.columns if c.key not in ("id", left_out)]
    lite = sqlite.dialect()
    assert driver_statement(insert_if_absent(lite, table, key), lite, columns) is None
