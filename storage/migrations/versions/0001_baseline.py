"""Baseline: the schema of release 529bd48, the last one without schema versions.

Created as it stands on an empty database; an index that release or an older one wrote is
completed to it (storage.migrations.baseline says how).

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

from alembic import op
from alembic.operations import Operations

from storage.migrations import baseline

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    baseline.create(Operations(op.get_context()))


def downgrade() -> None:
    baseline.metadata.drop_all(op.get_bind())
