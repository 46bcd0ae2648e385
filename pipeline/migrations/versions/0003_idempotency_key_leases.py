"""Idempotency keys carry the claim of the request running with them, and their job.

Revision ID: 0003
Revises: 0002

lease_token, lease_expires_at: the claim of the request running with the key, a lease
that lapses in seconds so a retry can take it over after a crash.
job_id: the job the key made, written in the job's own transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = ("lease_token", "lease_expires_at", "job_id")


def upgrade() -> None:
    op.add_column("idempotency_keys", sa.Column("lease_token", sa.Text))
    op.add_column("idempotency_keys",
                  sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    op.add_column("idempotency_keys", sa.Column("job_id", sa.Uuid))


def downgrade() -> None:
    # SQLite cannot drop these columns in place: batch mode copies the table without them.
    with op.batch_alter_table("idempotency_keys") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
