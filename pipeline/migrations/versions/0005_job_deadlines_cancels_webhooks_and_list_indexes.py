"""A client's deadline, who cancelled and when, a job's webhook, and the list's indexes.

Revision ID: 0005
Revises: 0004

cancel_after: the `Cancel-After` deadline; the sweeper cancels a job not done by then.
cancelled_at, cancelled_by: when a job was cancelled and by whom ("API key <id>", or
"deadline").
webhook_url, webhook_events: where the job's events are sent, and which (NULL: all).
ix_jobs_company_status_created: GET /v1/jobs filtered by status, newest first.
ix_jobs_waiting: queue positions count a provider's waiting jobs in order; partial, so
it holds only the jobs still waiting.
ix_jobs_cancel_after: the sweeper's deadline pass; partial, live jobs with a deadline.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# As this revision wrote them (the models may change later; a revision does not).
WAITING = "status IN ('pending', 'queued')"
DEADLINED = "cancel_after IS NOT NULL AND status IN ('pending', 'queued', 'processing')"
Json = sa.JSON().with_variant(JSONB(), "postgresql")

JOB_COLUMNS = (
    ("cancel_after", sa.DateTime(timezone=True)),
    ("cancelled_at", sa.DateTime(timezone=True)),
    ("cancelled_by", sa.Text),
    ("webhook_url", sa.Text),
    ("webhook_events", Json),
)


def upgrade() -> None:
    for name, kind in JOB_COLUMNS:
        op.add_column("jobs", sa.Column(name, kind))
    op.create_index("ix_jobs_company_status_created", "jobs",
                    ["company_id", "status", "created_at"])
    op.create_index("ix_jobs_waiting", "jobs", ["provider", "created_at", "id"],
                    postgresql_where=sa.text(WAITING), sqlite_where=sa.text(WAITING))
    op.create_index("ix_jobs_cancel_after", "jobs", ["cancel_after"],
                    postgresql_where=sa.text(DEADLINED), sqlite_where=sa.text(DEADLINED))


def downgrade() -> None:
    for name in ("ix_jobs_cancel_after", "ix_jobs_waiting", "ix_jobs_company_status_created"):
        op.drop_index(name, table_name="jobs")
    # SQLite cannot drop these columns in place: batch mode copies the table without them.
    with op.batch_alter_table("jobs") as batch:
        for name, _kind in reversed(JOB_COLUMNS):
            batch.drop_column(name)
