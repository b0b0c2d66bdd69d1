"""Counts of analysis jobs and deliveries by state, and the latest errors, for `status`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from storage.models import (
    AnalysisJob,
    Delivery,
    IdentityConflict,
    Instance,
    JobResult,
    JobState,
    ResultState,
)


@dataclass(frozen=True)
class QueueReport:
    instances: int
    results: int
    jobs: dict[str, int]
    deliveries: dict[str, int]
    job_errors: list[tuple[str, str]]
    delivery_errors: list[tuple[str, str, str]]
    skip_reasons: list[tuple[str, int]]
    conflicts: dict[str, int]  # identity conflicts by action ("refused", "accepted")
    kept_reasons: list[tuple[str, int]]  # analysed images whose results are not sent, by why
    kinds: dict[str, dict[str, int]]  # result objects by kind, then state
    kept_results: int = 0  # result objects stored but not sent anywhere


def job_counts(engine: Engine) -> dict[str, int]:
    """Analysis jobs by state (the metrics' queue depth, read at each scrape)."""
    with engine.connect() as conn:
        rows = conn.execute(select(AnalysisJob.state, func.count()).group_by(AnalysisJob.state))
        return {str(getattr(state, "value", state)): count for state, count in rows}


def report_data(report: QueueReport) -> dict[str, Any]:
    """The report as JSON-ready data with named fields (`status --json`)."""
    return {
        "instances": report.instances,
        "results": report.results,
        "jobs": dict(sorted(report.jobs.items())),
        "deliveries": dict(sorted(report.deliveries.items())),
        "result_objects": {k: dict(sorted(s.items())) for k, s in sorted(report.kinds.items())},
        "identity_conflicts": dict(sorted(report.conflicts.items())),
        "kept_results": report.kept_results,
        "kept_reasons": [{"reason": r, "count": c} for r, c in report.kept_reasons],
        "skip_reasons": [{"reason": r, "count": c} for r, c in report.skip_reasons],
        "job_errors": [{"sop_instance_uid": u, "reason": r} for u, r in report.job_errors],
        "delivery_errors": [
            {"sop_instance_uid": u, "destination_ae": ae, "error": e}
            for u, ae, e in report.delivery_errors
        ],
    }


def queue_report(engine: Engine, last: int = 5) -> QueueReport:
    with engine.connect() as conn:
        instances = conn.scalar(select(func.count()).select_from(Instance)) or 0
        results = (
            conn.scalar(
                select(func.count()).select_from(Instance).where(Instance.is_result.is_(True))
            )
            or 0
        )
        jobs = dict(
            conn.execute(select(AnalysisJob.state, func.count()).group_by(AnalysisJob.state)).all()
        )
        deliveries = dict(
            conn.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        )
        job_errors = conn.execute(
            select(AnalysisJob.sop_instance_uid, AnalysisJob.reason)
            .where(AnalysisJob.state == JobState.FAILED)
            .order_by(AnalysisJob.finished_at.desc())
            .limit(last)
        ).all()
        delivery_errors = conn.execute(
            select(Delivery.sop_instance_uid, Delivery.destination_ae, Delivery.last_error)
            .where(Delivery.last_error != "")
            .order_by(Delivery.next_attempt_at.desc())
            .limit(last)
        ).all()
        skip_reasons = conn.execute(
            select(AnalysisJob.reason, func.count())
            .where(AnalysisJob.state == JobState.SKIPPED)
            .group_by(AnalysisJob.reason)
            .order_by(func.count().desc())
            .limit(last)
        ).all()
        kept_reasons = conn.execute(
            select(AnalysisJob.reason, func.count())
            .where(AnalysisJob.state == JobState.DONE, AnalysisJob.reason != "")
            .group_by(AnalysisJob.reason)
            .order_by(func.count().desc())
        ).all()
        kinds: dict[str, dict[str, int]] = {}
        for kind, state, count in conn.execute(
            select(JobResult.kind, JobResult.state, func.count()).group_by(
                JobResult.kind, JobResult.state
            )
        ):
            kinds.setdefault(kind, {})[str(getattr(state, "value", state))] = count
        kept_results = conn.scalar(
            select(func.count())
            .select_from(JobResult)
            .join(AnalysisJob, AnalysisJob.id == JobResult.job_pk)
            .where(
                AnalysisJob.state == JobState.DONE,
                AnalysisJob.reason != "",
                JobResult.state == ResultState.STORED,
            )
        ) or 0
        conflicts = dict(
            conn.execute(
                select(IdentityConflict.action, func.count()).group_by(IdentityConflict.action)
            ).all()
        )
    return QueueReport(
        instances=instances,
        results=results,
        jobs={str(getattr(k, "value", k)): v for k, v in jobs.items()},
        deliveries={str(getattr(k, "value", k)): v for k, v in deliveries.items()},
        job_errors=[tuple(r) for r in job_errors],
        delivery_errors=[tuple(r) for r in delivery_errors],
        skip_reasons=[tuple(r) for r in skip_reasons],
        conflicts=conflicts,
        kept_reasons=[tuple(r) for r in kept_reasons],
        kinds=kinds,
        kept_results=kept_results,
    )


def format_report(report: QueueReport) -> str:
    lines = [
        f"instances: {report.instances} ({report.results} results made by this node)",
        "analysis jobs: "
        + (", ".join(f"{k} {v}" for k, v in sorted(report.jobs.items())) or "none"),
        "deliveries: "
        + (", ".join(f"{k} {v}" for k, v in sorted(report.deliveries.items())) or "none"),
        "result objects: "
        + (
            "; ".join(
                f"{kind.upper()} " + ", ".join(
                    f"{state.replace('_', ' ')} {count}" for state, count in sorted(states.items())
                )
                for kind, states in sorted(report.kinds.items())
            )
            or "none"
        ),
        "identity conflicts (study under another patient, series under another study): "
        + (", ".join(f"{k} {v}" for k, v in sorted(report.conflicts.items())) or "none"),
    ]
    if report.kept_reasons:
        images = sum(count for _, count in report.kept_reasons)
        lines.append(
            f"results kept on the node, not sent: {report.kept_results} (of {images} images)"
        )
        lines += [f"  {count:6d}  {reason}" for reason, count in report.kept_reasons]
    if report.skip_reasons:
        lines.append("skipped, by reason:")
        lines += [f"  {count:6d}  {reason}" for reason, count in report.skip_reasons]
    if report.job_errors:
        lines.append("last analysis errors:")
        lines += [f"  {uid}: {reason}" for uid, reason in report.job_errors]
    if report.delivery_errors:
        lines.append("last delivery errors:")
        lines += [f"  {uid} -> {ae}: {error}" for uid, ae, error in report.delivery_errors]
    return "\n".join(lines)
