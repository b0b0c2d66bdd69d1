"""What the service handlers share: the configuration, the archive and the index engine.

Built once at start and passed to each pynetdicom handler as its extra argument, so a
handler stays a plain function of (event, context) that returns DIMSE statuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from node.config import Config
from storage.archive import Archive, JobDecision
from storage.database import create_index_engine
from storage.filestore import FileStore


@dataclass
class NodeContext:
    config: Config
    engine: Engine
    archive: Archive


def build_context(config: Config, decide_job: JobDecision | None = None) -> NodeContext:
    """Open (and create if needed) the file store and the index named by `config`."""
    engine = create_index_engine(config.storage.database_url)
    files = FileStore(config.storage.folder, fsync=config.storage.fsync)
    archive = Archive(
        files,
        engine,
        duplicate_policy=config.storage.duplicate_policy,
        decide_job=decide_job,
    )
    return NodeContext(config=config, engine=engine, archive=archive)
