"""The first release's schema: every table as it stood before the first migration.

Revision ID: 0001
Revises: none

Written out in full rather than imported from pipeline/tables.py, so that this revision
keeps describing the first release however the tables change later. Credits are
NUMERIC(20,6) on PostgreSQL and integer micro-credits on SQLite (pipeline.tables.Credits).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CREDITS = sa.Numeric(20, 6).with_variant(sa.BigInteger(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
EMPTY_OBJECT = sa.text("'{}'")


def _at(name: str, *, required: bool = False) -> sa.Column:
    if required:
        return sa.Column(name, sa.DateTime(timezone=True), nullable=False,
                         server_default=sa.func.now())
    return sa.Column(name, sa.DateTime(timezone=True))


def _id() -> sa.Column:
    return sa.Column("id", sa.Uuid, primary_key=True)


def _fk(column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"])


def upgrade() -> None:
    _accounts()
    _jobs()
    _ledger()
    _records()
    _controls()


def _accounts() -> None:
    op.create_table(
        "companies",
        _id(),
        sa.Column("name", sa.Text, nullable=False),
        _at("created_at", required=True),
        _at("updated_at", required=True),
    )
    op.create_table(
        "users",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("email", sa.Text),
        sa.Column("name", sa.Text),
        _at("created_at", required=True),
        _fk("company_id", "companies"),
    )
    op.create_index("ix_users_company", "users", ["company_id"])
    op.create_table(
        "api_keys",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid),
        sa.Column("name", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("key_hash", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False, server_default=sa.text("'client'")),
        _at("created_at", required=True),
        _at("last_used_at"),
        _at("revoked_at"),
        _fk("company_id", "companies"),
        _fk("user_id", "users"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_hash"),
        sa.CheckConstraint("scope IN ('client', 'admin')", name="ck_api_keys_scope"),
    )
    op.create_index("ix_api_keys_company", "api_keys", ["company_id"])
    op.create_table(
        "wallets",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid),
        sa.Column("credits_available", CREDITS, nullable=False, server_default=sa.text("0")),
        sa.Column("credits_held", CREDITS, nullable=False, server_default=sa.text("0")),
        sa.Column("credits_used", CREDITS, nullable=False, server_default=sa.text("0")),
        _at("created_at", required=True),
        _at("updated_at", required=True),
        _fk("company_id", "companies"),
        _fk("user_id", "users"),
        sa.UniqueConstraint("company_id", name="uq_wallets_company"),
        sa.CheckConstraint("credits_available >= 0", name="ck_wallets_available_nonneg"),
        sa.CheckConstraint("credits_held >= 0", name="ck_wallets_held_nonneg"),
        sa.CheckConstraint("credits_used >= 0", name="ck_wallets_used_nonneg"),
    )
    op.create_table(
        "providers",
        _id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("content_types", JSON, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("pricing", JSON, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("config", JSON, nullable=False, server_default=EMPTY_OBJECT),
        _at("created_at", required=True),
        _at("updated_at", required=True),
        sa.UniqueConstraint("name", name="uq_providers_name"),
    )


def _jobs() -> None:
    op.create_table(
        "jobs",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid),
        sa.Column("api_key_id", sa.Uuid),
        sa.Column("provider_id", sa.Uuid),
        sa.Column("transaction_id", sa.Uuid),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("source", sa.Text, nullable=False, server_default=sa.text("'v1'")),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("settings", JSON, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("result", JSON),
        sa.Column("preview", sa.Text),
        sa.Column("output_key", sa.Text),
        sa.Column("output", JSON),
        sa.Column("remote_id", sa.Text),
        sa.Column("progress", sa.Double),
        sa.Column("error", sa.Text),
        sa.Column("error_code", sa.Text),
        sa.Column("estimated_cost", CREDITS, nullable=False),
        sa.Column("actual_cost", CREDITS),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        _at("created_at", required=True),
        _at("updated_at", required=True),
        _at("queued_at"),
        _at("reserved_at"),
        _at("started_at"),
        _at("heartbeat_at"),
        _at("stored_at"),
        _at("settled_at"),
        _at("completed_at"),
        _fk("company_id", "companies"),
        _fk("user_id", "users"),
        _fk("api_key_id", "api_keys"),
        _fk("provider_id", "providers"),
        sa.CheckConstraint("content_type IN ('text', 'image', 'audio', 'video')",
                           name="ck_jobs_content_type"),
        sa.CheckConstraint(
            "status IN ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')",
            name="ck_jobs_status",
        ),
        sa.CheckConstraint("estimated_cost >= 0", name="ck_jobs_estimated_cost_nonneg"),
        sa.CheckConstraint("actual_cost >= 0", name="ck_jobs_actual_cost_nonneg"),
    )
    op.create_index("ix_jobs_company_created", "jobs", ["company_id", "created_at"])
    op.create_index("ix_jobs_status_heartbeat", "jobs", ["status", "heartbeat_at"])
    op.create_table(
        "job_dispatches",
        sa.Column("job_id", sa.Uuid, primary_key=True),
        sa.Column("queue", sa.Text, nullable=False),
        _at("created_at", required=True),
        _at("sent_at"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        _fk("job_id", "jobs"),
    )
    op.create_index("ix_job_dispatches_unsent", "job_dispatches", ["sent_at", "created_at"])


def _ledger() -> None:
    op.create_table(
        "transactions",
        _id(),
        sa.Column("wallet_id", sa.Uuid, nullable=False),
        sa.Column("job_id", sa.Uuid),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("amount", CREDITS, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'posted'")),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("reference_id", sa.Uuid),
        sa.Column("metadata", JSON, nullable=False, server_default=EMPTY_OBJECT),
        _at("created_at", required=True),
        _at("updated_at", required=True),
        _fk("wallet_id", "wallets"),
        _fk("job_id", "jobs"),
        sa.UniqueConstraint("idempotency_key", name="uq_transactions_idempotency_key"),
        sa.CheckConstraint("type IN ('deposit', 'reservation', 'debit', 'release', 'refund')",
                           name="ck_transactions_type"),
        sa.CheckConstraint("amount > 0", name="ck_transactions_amount_positive"),
    )
    op.create_index("ix_transactions_wallet_created", "transactions", ["wallet_id", "created_at"])
    op.create_index("ix_transactions_job", "transactions", ["job_id"])
    op.create_table(
        "credit_holds",
        _id(),
        sa.Column("wallet_id", sa.Uuid, nullable=False),
        sa.Column("job_id", sa.Uuid, nullable=False),
        sa.Column("amount", CREDITS, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'open'")),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        _at("created_at", required=True),
        _at("closed_at"),
        _fk("wallet_id", "wallets"),
        _fk("job_id", "jobs"),
        sa.UniqueConstraint("job_id", name="uq_credit_holds_job"),
        sa.CheckConstraint("status IN ('open', 'settled', 'voided')",
                           name="ck_credit_holds_status"),
        sa.CheckConstraint("amount >= 0", name="ck_credit_holds_amount_nonneg"),
    )
    op.create_index("ix_credit_holds_status_expires", "credit_holds", ["status", "expires_at"])


def _records() -> None:
    op.create_table(
        "media_assets",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("job_id", sa.Uuid, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("storage_key", sa.Text, nullable=False),
        sa.Column("mime_type", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("metadata", JSON, nullable=False, server_default=EMPTY_OBJECT),
        _at("created_at", required=True),
        _fk("company_id", "companies"),
        _fk("job_id", "jobs"),
        sa.UniqueConstraint("job_id", name="uq_media_assets_job"),
    )
    op.create_index("ix_media_assets_company", "media_assets", ["company_id"])
    op.create_table(
        "api_usage",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("job_id", sa.Uuid, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("usage", JSON, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("cost", CREDITS, nullable=False),
        sa.Column("metadata", JSON, nullable=False, server_default=EMPTY_OBJECT),
        _at("created_at", required=True),
        _fk("company_id", "companies"),
        _fk("job_id", "jobs"),
        sa.UniqueConstraint("job_id", name="uq_api_usage_job"),
    )
    op.create_index("ix_api_usage_company_created", "api_usage", ["company_id", "created_at"])
    op.create_table(
        "provider_keys",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("key_data", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        _at("created_at", required=True),
        _at("updated_at", required=True),
        _fk("company_id", "companies"),
        sa.UniqueConstraint("company_id", "provider", name="uq_provider_keys_company_provider"),
    )
    op.create_table(
        "logs",
        _id(),
        sa.Column("level", sa.Text, nullable=False),
        sa.Column("service", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("job_id", sa.Uuid),
        sa.Column("user_id", sa.Uuid),
        sa.Column("company_id", sa.Uuid),
        sa.Column("provider", sa.Text),
        sa.Column("content_type", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("metadata", JSON, nullable=False, server_default=EMPTY_OBJECT),
        _at("timestamp", required=True),
        sa.CheckConstraint("level IN ('debug', 'info', 'warn', 'error', 'critical')",
                           name="ck_logs_level"),
    )
    op.create_index("ix_logs_job", "logs", ["job_id"])
    op.create_table(
        "metrics",
        _id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("labels", JSON, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("job_id", sa.Uuid),
        _at("timestamp", required=True),
    )
    op.create_index("ix_metrics_name_timestamp", "metrics", ["name", "timestamp"])


def _controls() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'in_flight'")),
        sa.Column("response_status", sa.Integer),
        sa.Column("response_body", JSON),
        _at("created_at", required=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        _fk("company_id", "companies"),
        sa.PrimaryKeyConstraint("company_id", "key", name="pk_idempotency_keys"),
        sa.CheckConstraint("status IN ('in_flight', 'done')", name="ck_idempotency_keys_status"),
    )
    op.create_index("ix_idempotency_keys_expires", "idempotency_keys", ["expires_at"])
    op.create_table(
        "budgets",
        _id(),
        sa.Column("company_id", sa.Uuid, nullable=False),
        sa.Column("scope", sa.Text, nullable=False, server_default=sa.text("'company'")),
        sa.Column("subject", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("period", sa.Text, nullable=False),
        sa.Column("cap", CREDITS, nullable=False),
        _at("created_at", required=True),
        _at("updated_at", required=True),
        _fk("company_id", "companies"),
        sa.UniqueConstraint("company_id", "scope", "subject", "period", name="uq_budgets_subject"),
        sa.CheckConstraint("scope IN ('company', 'user', 'api_key')", name="ck_budgets_scope"),
        sa.CheckConstraint("period IN ('day', 'month')", name="ck_budgets_period"),
        sa.CheckConstraint("cap >= 0", name="ck_budgets_cap_nonneg"),
    )
    op.create_table(
        "job_attempts",
        _id(),
        sa.Column("job_id", sa.Uuid, nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("remote_id", sa.Text),
        sa.Column("outcome", sa.Text),
        sa.Column("error_code", sa.Text),
        sa.Column("error", sa.Text),
        _at("started_at", required=True),
        _at("finished_at"),
        _fk("job_id", "jobs"),
        sa.UniqueConstraint("job_id", "number", name="uq_job_attempts_job_number"),
    )
    op.create_table(
        "provider_circuits",
        sa.Column("provider", sa.Text, primary_key=True),
        sa.Column("consecutive_failures", sa.Integer, nullable=False,
                  server_default=sa.text("0")),
        _at("opened_until"),
        _at("updated_at", required=True),
    )


def downgrade() -> None:
    for table in ("provider_circuits", "job_attempts", "budgets", "idempotency_keys", "metrics",
                  "logs", "provider_keys", "api_usage", "media_assets", "credit_holds",
                  "transactions", "job_dispatches", "jobs", "providers", "wallets", "api_keys",
                  "users", "companies"):
        op.drop_table(table)
