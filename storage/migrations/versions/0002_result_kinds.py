"""Result kinds: the SC and SR columns of analysis_job become one job_result row per job and
kind, so that a new kind of result (the SEG) needs no new column.

Every done job of the previous release stored both objects: each non-empty UID becomes a
row in state `stored`. Written out in full (no import of storage.models), as every
migration must be: the models move on, this must not.

Revision ID: 0002_result_kinds
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_result_kinds"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

UID = sa.String(64)
RESULT_STATES = ("stored", "not_made", "failed")


def upgrade() -> None:
    job_result = op.create_table(
        "job_result",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_pk", sa.Integer, sa.ForeignKey("analysis_job.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column(
            "state",
            sa.Enum(*RESULT_STATES, name="resultstate", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.UniqueConstraint("job_pk", "kind"),
    )
    op.create_index("ix_job_result_job_pk", "job_result", ["job_pk"])
    op.create_index("ix_job_result_state", "job_result", ["state"])
    op.create_index("ix_job_result_sop_instance_uid", "job_result", ["sop_instance_uid"])

    jobs = sa.table(
        "analysis_job",
        sa.column("id", sa.Integer),
        sa.column("sc_sop_instance_uid", UID),
        sa.column("sr_sop_instance_uid", UID),
    )
    for kind in ("sr", "sc"):
        column = jobs.c[f"{kind}_sop_instance_uid"]
        op.execute(
            job_result.insert().from_select(
                ["job_pk", "kind", "state", "sop_instance_uid", "reason"],
                sa.select(
                    jobs.c.id, sa.literal(kind), sa.literal("stored"), column, sa.literal("")
                ).where(column != ""),
            )
        )
    with op.batch_alter_table("analysis_job") as batch:
        batch.drop_column("sc_sop_instance_uid")
        batch.drop_column("sr_sop_instance_uid")


def downgrade() -> None:
    with op.batch_alter_table("analysis_job") as batch:
        batch.add_column(sa.Column("sc_sop_instance_uid", UID, nullable=False, server_default=""))
        batch.add_column(sa.Column("sr_sop_instance_uid", UID, nullable=False, server_default=""))
    jobs = sa.table(
        "analysis_job",
        sa.column("id", sa.Integer),
        sa.column("sc_sop_instance_uid", UID),
        sa.column("sr_sop_instance_uid", UID),
    )
    results = sa.table(
        "job_result",
        sa.column("job_pk", sa.Integer),
        sa.column("kind", sa.String),
        sa.column("sop_instance_uid", UID),
    )
    for kind in ("sr", "sc"):
        uid = (
            sa.select(results.c.sop_instance_uid)
            .where(results.c.job_pk == jobs.c.id, results.c.kind == kind)
            .scalar_subquery()
        )
        op.execute(
            jobs.update().values({f"{kind}_sop_instance_uid": sa.func.coalesce(uid, "")})
        )
    op.drop_table("job_result")
