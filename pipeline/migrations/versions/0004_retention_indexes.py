"""Indexes the retention task deletes by, and the late-result path's lookup by job.

Revision ID: 0004
Revises: 0003

The prune task deletes `logs`, `metrics` and `api_usage` rows older than their
retention, oldest first: without an index on their timestamps each batch scans the
table. A late result replaces a failed job's `metrics` row, found by its job id.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_api_usage_created", "api_usage", ["created_at"]),
    ("ix_logs_timestamp", "logs", ["timestamp"]),
    ("ix_metrics_timestamp", "metrics", ["timestamp"]),
    ("ix_metrics_job", "metrics", ["job_id"]),
)


def upgrade() -> None:
    # IF NOT EXISTS: a database adopted from before migrations at 0003 may have been
    # made by a create_all that already had them.
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns, if_not_exists=True)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
