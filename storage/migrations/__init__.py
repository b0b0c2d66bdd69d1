"""The index schema's version and its numbered migrations (Alembic, driven from code).

`versions/NNNN_name.py` holds one migration each, its revision id the file's name
(`0001_baseline`, `0002_...`); the index records the version it is at in Alembic's
`alembic_version` table. storage.database runs the migrations at start (storage.migrations
.schema does the Alembic part); `python -m storage.migrations revision "message"` writes the
next one. Kept free of Alembic imports, so that the CLI can name the error cheaply.
"""

from __future__ import annotations

import logging

# Alembic logs its plugins when imported and its context each time it runs, at INFO, that
# is at every fresh index; storage.database logs one line per upgrade instead.
logging.getLogger("alembic").setLevel(logging.WARNING)


class IndexVersionError(RuntimeError):
    """The index is at a schema version this code does not know: a newer pneumonode wrote
    it, and reading or writing it with older code could lose or corrupt data."""

    def __init__(self, url: str, version: str, head: str) -> None:
        super().__init__(
            f"the index at {url} has schema version {version}, newer than this pneumonode "
            f"knows (up to {head}): upgrade pneumonode"
        )
        self.url = url
        self.version = version
        self.head = head
