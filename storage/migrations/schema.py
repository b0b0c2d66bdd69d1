"""The Alembic side of the index's schema version: the versions this code knows, the one an
index is at, and the upgrade to head on a connection that storage.database has locked.

Alembic runs from code: a `Config()` whose script location is this folder and whose
`attributes["connection"]` is the caller's connection (env.py uses it), no alembic.ini.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from storage.migrations import IndexVersionError

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None, location: Path | None = None) -> Config:
    """Alembic's configuration for the migrations in `location` (default: this package)."""
    config = Config()
    config.set_main_option("script_location", str(location or SCRIPT_LOCATION))
    # The revision id is the file's name: versions/0002_result_kinds.py is 0002_result_kinds.
    config.set_main_option("file_template", "%%(rev)s")
    config.attributes["connection"] = connection
    return config


@functools.cache
def _script(location: Path) -> tuple[ScriptDirectory, frozenset[str]]:
    script = ScriptDirectory.from_config(alembic_config(location=location))
    return script, frozenset(revision.revision for revision in script.walk_revisions())


def script_directory() -> ScriptDirectory:
    return _script(SCRIPT_LOCATION)[0]


def heads() -> tuple[str, ...]:
    """The newest version this code knows (one, as long as the history has no branches)."""
    return tuple(script_directory().get_heads())


def current_versions(conn: Connection) -> tuple[str, ...]:
    """The versions the index records; () for an empty database or an index that predates
    schema versions."""
    return tuple(MigrationContext.configure(conn).get_current_heads())


def at_head(url: str, versions: tuple[str, ...]) -> bool:
    """Whether an index at `versions` needs nothing; IndexVersionError when one of them is
    not a version this code knows (a newer pneumonode wrote it), before anything changes."""
    known = _script(SCRIPT_LOCATION)[1]
    newest = heads()
    for version in versions:
        if version not in known:
            raise IndexVersionError(url, version, ", ".join(newest))
    return set(versions) == set(newest)


def upgrade(conn: Connection) -> None:
    """Run every migration from the index's version to head, in `conn`'s transaction."""
    command.upgrade(alembic_config(conn), "head")
