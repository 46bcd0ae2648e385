"""Signed webhooks: each company's signing secrets, and one delivery row per job event.

Revision ID: 0006
Revises: 0005

webhook_secrets: the company's current `whsec_` secret and, during a rotation's grace
period, the previous one (both Fernet ciphertext, as provider keys are stored).
webhook_deliveries: the outbox of webhook events and their delivery log; written in the
transaction that changed the job, sent by the maintenance workers.
ix_webhook_deliveries_due: the relay's scan for pending deliveries that are due; partial,
so it holds only the pending ones.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# As this revision wrote them (the models may change later; a revision does not).
PENDING = "status = 'pending'"
Json = sa.JSON().with_variant(JSONB(), "postgresql")


def _ts(name: str, *, required: bool = False) -> sa.Column:
    if required:
        return sa.Column(name, sa.DateTime(timezone=True), nullable=False,
                         server_default=sa.func.now())
    return sa.Column(name, sa.DateTime(timezone=True))


def upgrade() -> None:
    op.create_table(
        "webhook_secrets",
        sa.Column("company_id", sa.Uuid, sa.ForeignKey("companies.id"), primary_key=True),
        sa.Column("secret_data", sa.Text, nullable=False),
        sa.Column("previous_data", sa.Text),
        _ts("previous_expires_at"),
        _ts("created_at", required=True),
        _ts("rotated_at"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("job_id", sa.Uuid, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("company_id", sa.Uuid, sa.ForeignKey("companies.id"), nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("sequence", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("payload", Json),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        _ts("next_attempt_at"),
        sa.Column("claim_token", sa.Text),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        _ts("created_at", required=True),
        _ts("updated_at", required=True),
        _ts("last_attempt_at"),
        _ts("delivered_at"),
        sa.UniqueConstraint("job_id", "event", "sequence",
                            name="uq_webhook_deliveries_job_event"),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')",
                           name="ck_webhook_deliveries_status"),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["next_attempt_at"],
                    postgresql_where=sa.text(PENDING), sqlite_where=sa.text(PENDING))


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
