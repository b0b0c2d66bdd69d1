"""The statements that index a new instance, run on the database driver's cursor.

SQLAlchemy Core's `Connection.execute` spends about 35 µs of Python around each statement
(looking up the compiled form, processing the parameters, setting up a result): for the
five statements that index a new instance (patient, study, series, instance, attribute
rows), more than SQLite takes to run them, and about a twentieth of the node's CPU per
received image. The statements stay Core statements, compiled by SQLAlchemy for the
connection's dialect: `DriverStatement` keeps the SQL text SQLAlchemy made, the order of
its parameters and the column types' own bind processors, and runs it on the cursor of
the connection's transaction (same SQL, same values, same transaction).

Only for SQLite, whose work happens in the node's own processes (a database server's
happens in its own). A statement for which SQLAlchemy itself would compute something at
execution time (a column default for a column the values leave out, a server default to
fetch back) is not taken either: `driver_statement` returns None and the caller executes
it through SQLAlchemy.
tests/test_driver_statements.py checks that the rows are those SQLAlchemy writes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.sql.dml import Insert

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class DriverStatement:
    """A compiled statement and how its values become the driver's parameters."""

    sql: str
    names: tuple[str, ...]  # bind parameter names, in the order of the SQL's "?"
    processors: tuple[Processor, ...]

    def parameters(self, values: Mapping[str, Any]) -> list[Any]:
        return [
            values[name] if processor is None else processor(values[name])
            for name, processor in zip(self.names, self.processors, strict=True)
        ]

    def first(self, conn: Connection, values: Mapping[str, Any]) -> tuple | None:
        """Run with `values`; the first row it returns (RETURNING), or None."""
        cursor = conn.connection.cursor()
        try:
            cursor.execute(self.sql, self.parameters(values))
            return cursor.fetchone()
        finally:
            cursor.close()

    def execute_many(self, conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        """Run once for each of `rows` (executemany)."""
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(self.sql, [self.parameters(row) for row in rows])
        finally:
            cursor.close()


def driver_statement(
    statement: Insert, dialect: Dialect, columns: Iterable[str]
) -> DriverStatement | None:
    """`statement` with values for `columns`, compiled for `dialect`; None when it needs
    SQLAlchemy at execution time (see the module docstring)."""
    return _compiled(statement, dialect, tuple(columns))


@functools.lru_cache(maxsize=256)
def _compiled(
    statement: Insert, dialect: Dialect, columns: tuple[str, ...]
) -> DriverStatement | None:
    if dialect.name != "sqlite":
        return None  # a database server spends its time in another process anyway
    compiled = statement.compile(dialect=dialect, column_keys=list(columns))
    if compiled.insert_prefetch or compiled.postfetch:
        return None
    if not compiled.positional:
        return None  # pysqlite's style is "?"; another would need named parameters
    names = tuple(compiled.positiontup or ())
    if not set(names) <= set(columns):
        return None  # a parameter the values do not carry (a literal bound by SQLAlchemy)
    processors = tuple(
        compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    return DriverStatement(str(compiled), names, processors)
