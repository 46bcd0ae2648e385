"""Jobs pinned to a provider, woken at a time, bound by a deadline; leases on instances.

Revision ID: 0002
Revises: 0001

provider_pinned: the caller named the provider, so the job never runs elsewhere.
wake_at: when a released job's scheduled retry or poll is due (the sweeper waits for it).
deadline_at: when the provider's remote work must be done, or be cancelled.
provider_leases: one running job per instance of a multi-instance provider (a ComfyUI
GPU) across every worker and machine, taken by a conditional UPDATE, renewed by the
holder's heartbeat, free again when released or past its expiry.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JOB_COLUMNS = ("provider_pinned", "wake_at", "deadline_at")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("provider_pinned", sa.Boolean, nullable=False,
                                    server_default=sa.text("false")))
    op.add_column("jobs", sa.Column("wake_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("deadline_at", sa.DateTime(timezone=True)))
    # A database made before migrations on SQLite got every table of the version that
    # last opened it (create_all) but never a new column: it can hold this table while
    # it is at revision 0001 by its columns (pipeline.migrations adopts it there).
    if not sa.inspect(op.get_bind()).has_table("provider_leases"):
        op.create_table(
            "provider_leases",
            sa.Column("resource", sa.Text, primary_key=True),
            sa.Column("job_id", sa.Uuid),
            sa.Column("expires_at", sa.DateTime(timezone=True)),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                      server_default=sa.func.now()),
        )


def downgrade() -> None:
    op.drop_table("provider_leases")
    # SQLite cannot drop these columns in place: batch mode copies the table without them.
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(JOB_COLUMNS):
            batch.drop_column(column)
