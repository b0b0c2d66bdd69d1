"""Write the next numbered migration: `python -m storage.migrations revision "message"`.

The equivalent of `alembic revision --autogenerate` without an alembic.ini: a scratch SQLite
index is brought to the current head, compared with storage/models.py, and the difference
written as versions/NNNN_<message>.py (revision id = file name, the number one past the
highest). `--empty` writes the file with empty upgrade/downgrade functions instead. Read and
finish what it writes: data moves (rows into a new table, a column's new meaning) are
never detected, and SQLite reflects less than PostgreSQL.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from alembic import command

from storage.migrations import schema

MAX_REVISION_LENGTH = 32  # alembic_version.version_num is VARCHAR(32)


def next_revision_id(message: str, versions: Path) -> str:
    """`NNNN_words_of_the_message`, numbered one past the highest file in `versions`."""
    names = (re.match(r"(\d{4})_", path.name) for path in versions.glob("*.py"))
    revision = f"{max((int(m.group(1)) for m in names if m), default=0) + 1:04d}"
    for word in re.findall(r"[a-z0-9]+", message.lower()):
        if len(revision) + 1 + len(word) > MAX_REVISION_LENGTH:
            break
        revision += f"_{word}"
    return revision


def write_revision(message: str, autogenerate: bool) -> Path:
    from storage.database import create_index_engine

    versions = schema.SCRIPT_LOCATION / "versions"
    revision = next_revision_id(message, versions)
    with tempfile.TemporaryDirectory(prefix="pneumonode-revision-") as scratch:
        engine = create_index_engine(f"sqlite:///{Path(scratch) / 'index.sqlite'}")
        try:
            with engine.begin() as conn:
                command.revision(
                    schema.alembic_config(conn),
                    message=message,
                    autogenerate=autogenerate,
                    rev_id=revision,
                )
        finally:
            engine.dispose()
    return versions / f"{revision}.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.migrations", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    revision = commands.add_parser("revision", help="write the next numbered migration")
    revision.add_argument("message", help="what the migration does, in a few words")
    revision.add_argument("--empty", action="store_true", help="do not compare with models.py")
    commands.add_parser("heads", help="print the newest schema version this code knows")
    args = parser.parse_args(argv)
    if args.command == "heads":
        print(", ".join(schema.heads()))
        return 0
    path = write_revision(args.message, autogenerate=not args.empty)
    print(f"wrote {path}: read it, finish it, and add a test that upgrades an index to it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
