"""What the service handlers share: the configuration, the archive and the index engine.

Built once at start and passed to each pynetdicom handler as its extra argument, so a
handler stays a plain function of (event, context) that returns DIMSE statuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from node.config import Config
from node.eligibility import Eligibility
from storage.archive import Archive, JobDecision
from storage.database import create_index_engine
from storage.filestore import FileStore
from storage.intake import MIB, IntakeChecks


@dataclass
class NodeContext:
    config: Config
    engine: Engine
    archive: Archive


def job_decision(config: Config) -> JobDecision | None:
    """The eligibility rule that queues analysis jobs, when analysis is enabled."""
    if not config.analysis.enabled:
        return None
    return Eligibility(config.analysis.modalities, config.analysis.body_parts)


def build_context(config: Config, decide_job: JobDecision | None = None) -> NodeContext:
    """Open (and create if needed) the file store and the index named by `config`.

    Jobs are queued by the configured eligibility rule unless `decide_job` is given.
    """
    decide_job = decide_job or job_decision(config)
    engine = create_index_engine(config.storage.database_url)
    files = FileStore(config.storage.folder, fsync=config.storage.fsync)
    archive = Archive(
        files,
        engine,
        duplicate_policy=config.storage.duplicate_policy,
        decide_job=decide_job,
        checks=IntakeChecks(
            max_instance_bytes=config.storage.max_instance_mib * MIB,
            verify_pixels=config.storage.verify_pixels,
        ),
        identity_conflicts=config.storage.identity_conflicts,
    )
    return NodeContext(config=config, engine=engine, archive=archive)
