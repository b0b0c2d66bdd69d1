"""What a node's index says, read from outside the node: where an instance is stored, how
many there are, and how many analysis jobs and deliveries wait in each state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, create_engine, func, select

from node.testing.node_process import NodeProcess
from storage.models import AnalysisJob, Delivery, Instance, JobResult, ResultState


@contextlib.contextmanager
def index_connection(db_url: str) -> Iterator[Connection]:
    """A connection to a node's index, opened from outside the node, closed after use."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def stored_path(node: NodeProcess, sop_instance_uid: str) -> Path:
    """Where the node keeps an instance, as its index says."""
    with index_connection(node.db_url) as conn:
        relative = conn.scalar(
            select(Instance.file_path).where(Instance.sop_instance_uid == sop_instance_uid)
        )
    assert relative is not None, f"{sop_instance_uid} is not in the index"
    return node.storage / "files" / relative


def count_instances(db_url: str) -> int:
    with index_connection(db_url) as conn:
        return int(conn.scalar(select(func.count()).select_from(Instance)))


def _counts_by_state(node: NodeProcess, state_column) -> dict[str, int]:
    with index_connection(node.db_url) as conn:
        rows = conn.execute(select(state_column, func.count()).group_by(state_column)).all()
    return {str(getattr(state, "value", state)): count for state, count in rows}


def job_counts(node: NodeProcess) -> dict[str, int]:
    return _counts_by_state(node, AnalysisJob.state)


def delivery_counts(node: NodeProcess) -> dict[str, int]:
    return _counts_by_state(node, Delivery.state)


def result_uids_of(node: NodeProcess, source_sop_instance_uid: str) -> dict[str, str]:
    """The stored results of one source image, by kind ("sr", "seg", "sc")."""
    with index_connection(node.db_url) as conn:
        rows = conn.execute(
            select(JobResult.kind, JobResult.sop_instance_uid)
            .join(AnalysisJob, AnalysisJob.id == JobResult.job_pk)
            .where(
                AnalysisJob.sop_instance_uid == source_sop_instance_uid,
                JobResult.state == ResultState.STORED,
            )
        ).all()
    return dict(rows)


def result_counts(node: NodeProcess) -> dict[tuple[str, str], int]:
    """Result objects by (kind, state)."""
    with index_connection(node.db_url) as conn:
        rows = conn.execute(
            select(JobResult.kind, JobResult.state, func.count()).group_by(
                JobResult.kind, JobResult.state
            )
        ).all()
    return {(kind, str(getattr(state, "value", state))): count for kind, state, count in rows}
