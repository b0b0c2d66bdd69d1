"""Engine and session factory for the index, for SQLite or any other SQLAlchemy URL.

Everything database-specific stays here: SQLite gets WAL (readers never block the writer,
and a commit is one append to the log), a busy timeout so that the Storage SCP, the worker
and the sender can share the file, and synchronous=FULL so a commit acknowledged to a
sender survives power loss, not just a crash of the process.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.indexer import backfill_folded_names
from storage.models import Base


def _configure_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_index_engine(url: str) -> Engine:
    """An engine for `url`, creating the SQLite file's folder and the schema if needed."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _configure_sqlite)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    with engine.begin() as conn:
        backfill_folded_names(conn)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a newer version declares to an index made by an older one
    (create_all makes missing tables, not missing columns)."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present or not column.nullable:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
            for index in table.indexes:
                index.create(conn, checkfirst=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
