"""Engine and session factory for the index, for SQLite or any other SQLAlchemy URL, and
the schema upgrade that every process runs when it opens the index.

Everything database-specific stays here: SQLite gets WAL (readers never block the writer,
and a commit is one append to the log), a busy timeout so that the Storage SCP, the worker
and the sender can share the file, and synchronous=FULL so a commit acknowledged to a
sender survives power loss, not just a crash of the process.

SQLite has one write lock per database file, and a process that finds it taken waits in
SQLite's busy handler, which sleeps whole milliseconds (1, 2, 5, 10, 15, 20, 25, 50 ms...)
before looking again: with two serve processes committing in turn, those sleeps, not the
~1 ms a commit holds the lock, set the pace of ingest (strace of bench/ingest: ~1.8 s of
sleeps per process for 200 images). `WriterTurns` queues the archive's writers on an
flock(2) of a file beside the index instead, which the kernel hands to the next waiter the
moment it is released; SQLite's lock is then nearly always free when asked for. It orders,
it does not guard: a writer that does not take a turn (the job queue, the sender) still
gets SQLite's own locking and busy handler, so nothing depends on every writer using it.

The schema changes only through the numbered migrations of storage/migrations. Serve
processes, workers, `status` and tests open the index at the same time, so the check and
the upgrade run in one transaction under the database's writers' lock: SQLite's write lock
taken up front (BEGIN IMMEDIATE), PostgreSQL's advisory transaction lock on a fixed key.
The second process waits, then finds the index at head. An index already at head costs
one version read and no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from storage.migrations import IndexVersionError

__all__ = [
    "IndexVersionError",
    "WriterTurns",
    "create_index_engine",
    "session_factory",
    "upgrade_index",
]

log = logging.getLogger(__name__)

# Beside a SQLite index file: the file whose flock(2) orders its writers (WriterTurns).
WRITER_TURNS_SUFFIX = "-writers"

# pg_advisory_xact_lock key of the schema upgrade (the bytes of "pnode-db").
POSTGRES_MIGRATION_LOCK = int.from_bytes(b"pnode-db", "big")
# How long a process opening a SQLite index waits for another one's upgrade (ms).
SQLITE_MIGRATION_WAIT_MS = 600_000


def _configure_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _configure_migrating_sqlite(dbapi_connection, _record) -> None:
    """The upgrade's own connection: the driver leaves transactions to SQLAlchemy's
    `begin` event (below), so DDL runs inside BEGIN IMMEDIATE instead of autocommitting;
    foreign keys are not enforced while Alembic copies tables (SQLite ignores the pragma
    inside a transaction), and are checked before the commit instead."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_MIGRATION_WAIT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=OFF")
    cursor.close()


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_index_engine(url: str) -> Engine:
    """An engine for `url`, creating the SQLite file's folder if needed and bringing the
    schema to the version this code knows (IndexVersionError if the index is newer)."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _configure_sqlite)
    try:
        upgrade_index(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def upgrade_index(engine: Engine) -> None:
    """Bring the index to head: create an empty one, give one that predates schema
    versions the baseline, run the migrations after an older version; refuse one at a
    version this code does not know, changing nothing."""
    from storage.migrations import schema  # Alembic: loaded by the processes that open the index

    url = engine.url.render_as_string(hide_password=True)
    with engine.connect() as conn:
        versions = schema.current_versions(conn)
    if schema.at_head(url, versions):
        return
    with _writers_lock(engine) as conn:
        versions = schema.current_versions(conn)  # another process may have upgraded it
        if schema.at_head(url, versions):
            return
        before = ", ".join(versions) or _unversioned(conn)
        schema.upgrade(conn)
        if conn.dialect.name == "sqlite":
            _check_foreign_keys(conn)
    if not _in_memory(engine):
        # The pooled connection that read the old version may keep SQLite's old schema for
        # its PRAGMAs (table_info, index_list): the engine starts again with new ones.
        engine.dispose()
    log.info("index schema upgraded from %s to %s", before, ", ".join(schema.heads()))


@contextlib.contextmanager
def _writers_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the database's writers' lock until it
    commits; nothing else writes meanwhile and no other upgrade runs beside it."""
    backend = engine.url.get_backend_name()
    if backend == "sqlite" and not _in_memory(engine):
        migrating = create_engine(engine.url, poolclass=NullPool)
        event.listen(migrating, "connect", _configure_migrating_sqlite)
        event.listen(migrating, "begin", _begin_immediate)
        try:
            with migrating.begin() as conn:
                yield conn
        finally:
            migrating.dispose()
        return
    with engine.begin() as conn:
        if backend == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(POSTGRES_MIGRATION_LOCK)))
        # An in-memory SQLite has one user; other databases get no lock and DDL that is
        # not transactional, so one process should open their index first.
        yield conn


def _in_memory(engine: Engine) -> bool:
    """A SQLite database that lives in its one connection (and dies with it)."""
    database = engine.url.database
    return engine.url.get_backend_name() == "sqlite" and database in (None, "", ":memory:")


def _unversioned(conn: Connection) -> str:
    """How to name the starting point of an index without a recorded version."""
    tables = set(inspect(conn).get_table_names())
    return "an index from before schema versions" if "instance" in tables else "an empty database"


def _check_foreign_keys(conn: Connection) -> None:
    """Refuse (roll back) an upgrade that left a row pointing at no parent."""
    broken = conn.execute(text("PRAGMA foreign_key_check")).all()
    if broken:
        raise RuntimeError(f"the schema upgrade broke {len(broken)} foreign keys, e.g. {broken[0]}")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


class WriterTurns:
    """Writers of one index take turns, woken at once when the one before is done.

    For a SQLite file: a thread lock (flock(2) does not exclude threads sharing one open
    file) then an exclusive flock of `<index>-writers`, opened once per process (a forked
    child opens its own, so parent and child never share one lock). For any other database
    (PostgreSQL locks rows, not the database) and an in-memory SQLite: nothing to wait for.
    """

    def __init__(self, engine: Engine) -> None:
        database = engine.url.database
        self.path: Path | None = None
        if engine.url.get_backend_name() == "sqlite" and not _in_memory(engine) and database:
            self.path = Path(database + WRITER_TURNS_SUFFIX)
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._fd_pid = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold this process's and then the index's writer turn for one transaction."""
        if self.path is None:
            yield
            return
        with self._thread_lock:
            fd = self._own_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _own_fd(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            assert self.path is not None
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._fd_pid = os.getpid()
        return self._fd

    def close(self) -> None:
        """Close this process's lock file (the next turn opens it again)."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None
