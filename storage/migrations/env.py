"""Alembic's environment for the index: it runs the migrations on the connection that
storage.migrations.schema hands over in `config.attributes["connection"]`, inside the
transaction (and under the lock) that storage.database opened, so there is no alembic.ini
and no URL here. `target_metadata` is the current models, for `revision --autogenerate`.
"""

from __future__ import annotations

from alembic import context

from storage.models import Base

if context.is_offline_mode():
    raise RuntimeError("pneumonode's migrations run on a live connection, not as SQL text")

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the index migrations through storage.migrations.schema")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters most things only by copying the table: Alembic's batch mode does that.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():  # the caller's transaction: commits with it, or not at all
    context.run_migrations()
