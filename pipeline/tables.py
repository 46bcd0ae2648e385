"""SQLAlchemy Core table definitions mirroring schema.sql (a test fails on any drift)."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

metadata = MetaData()

_SCALE = 10**6


class Credits(TypeDecorator):
    """NUMERIC(20,6) on PostgreSQL; scaled integers (micro-credits) on SQLite.

    SQLite has no exact decimal type: arithmetic on its NUMERIC columns is done in
    floating point. Integers keep the embedded ledger exact, including the
    arithmetic done inside UPDATE statements.
    """

    impl = Numeric(20, 6)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, 6, asdecimal=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = Decimal(value)
        if dialect.name == "sqlite":
            return int((value * _SCALE).to_integral_exact())
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if dialect.name == "sqlite":
            return (Decimal(int(value)) / _SCALE).quantize(Decimal("0.000001"))
        return Decimal(value).quantize(Decimal("0.000001"))


Json = JSON().with_variant(JSONB(), "postgresql")


def _now():
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


def _ts(name: str, *, required: bool = False):
    if required:
        return Column(name, DateTime(timezone=True), nullable=False, server_default=func.now())
    return Column(name, DateTime(timezone=True))


companies = Table(
    "companies",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Text, nullable=False),
    _now(),
    _ts("updated_at", required=True),
)

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("email", Text),
    Column("name", Text),
    _now(),
    Index("ix_users_company", "company_id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("user_id", Uuid, ForeignKey("users.id")),
    Column("name", Text, nullable=False, server_default=text("''")),
    Column("prefix", Text, nullable=False),
    Column("key_hash", Text, nullable=False),
    Column("scope", Text, nullable=False, server_default=text("'client'")),
    _now(),
    _ts("last_used_at"),
    _ts("revoked_at"),
    UniqueConstraint("key_hash", name="uq_api_keys_hash"),
    CheckConstraint("scope IN ('client', 'admin')", name="ck_api_keys_scope"),
    Index("ix_api_keys_company", "company_id"),
)

wallets = Table(
    "wallets",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("user_id", Uuid, ForeignKey("users.id")),
    Column("credits_available", Credits, nullable=False, server_default=text("0")),
    Column("credits_held", Credits, nullable=False, server_default=text("0")),
    Column("credits_used", Credits, nullable=False, server_default=text("0")),
    _now(),
    _ts("updated_at", required=True),
    UniqueConstraint("company_id", name="uq_wallets_company"),
    CheckConstraint("credits_available >= 0", name="ck_wallets_available_nonneg"),
    CheckConstraint("credits_held >= 0", name="ck_wallets_held_nonneg"),
    CheckConstraint("credits_used >= 0", name="ck_wallets_used_nonneg"),
)

providers = Table(
    "providers",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Text, nullable=False),
    Column("content_types", Json, nullable=False, server_default=text("'[]'")),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("pricing", Json, nullable=False, server_default=text("'{}'")),
    Column("config", Json, nullable=False, server_default=text("'{}'")),
    _now(),
    _ts("updated_at", required=True),
    UniqueConstraint("name", name="uq_providers_name"),
)

JOB_STATUSES = ("pending", "queued", "processing", "completed", "failed", "cancelled")
TERMINAL_STATUSES = ("completed", "failed", "cancelled")

WAITING = "status IN ('pending', 'queued')"
DEADLINED = "cancel_after IS NOT NULL AND status IN ('pending', 'queued', 'processing')"

jobs = Table(
    "jobs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("user_id", Uuid, ForeignKey("users.id")),
    Column("api_key_id", Uuid, ForeignKey("api_keys.id")),
    Column("provider_id", Uuid, ForeignKey("providers.id")),
    Column("transaction_id", Uuid),
    Column("provider", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("source", Text, nullable=False, server_default=text("'v1'")),
    Column("prompt", Text, nullable=False),
    Column("settings", Json, nullable=False, server_default=text("'{}'")),
    Column("result", Json),
    Column("preview", Text),
    Column("output_key", Text),
    Column("output", Json),
    Column("remote_id", Text),
    Column("progress", Double),
    Column("error", Text),
    Column("error_code", Text),
    Column("estimated_cost", Credits, nullable=False),
    Column("actual_cost", Credits),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # The caller named the provider: the job runs there or fails, never elsewhere.
    Column("provider_pinned", Boolean, nullable=False, server_default=text("false")),
    _now(),
    _ts("updated_at", required=True),
    _ts("wake_at"),  # a released job's scheduled retry or poll is due then
    _ts("deadline_at"),  # the provider's remote work must be done by then, or is cancelled
    _ts("queued_at"),
    _ts("reserved_at"),
    _ts("started_at"),
    _ts("heartbeat_at"),
    _ts("stored_at"),
    _ts("settled_at"),
    _ts("completed_at"),
    _ts("cancel_after"),  # the client's deadline (Cancel-After): cancelled if not done by then
    _ts("cancelled_at"),
    Column("cancelled_by", Text),  # who asked: "API key <id>", or "deadline"
    Column("webhook_url", Text),  # where this job's events are sent, if anywhere
    Column("webhook_events", Json),  # which of them (None: every event)
    CheckConstraint(
        "content_type IN ('text', 'image', 'audio', 'video')", name="ck_jobs_content_type"
    ),
    CheckConstraint(
        "status IN ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')",
        name="ck_jobs_status",
    ),
    CheckConstraint("estimated_cost >= 0", name="ck_jobs_estimated_cost_nonneg"),
    CheckConstraint("actual_cost >= 0", name="ck_jobs_actual_cost_nonneg"),
    Index("ix_jobs_company_created", "company_id", "created_at"),
    Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
    # The list filtered by status, newest first, within one company.
    Index("ix_jobs_company_status_created", "company_id", "status", "created_at"),
    # Queue positions: the waiting jobs of a provider in order; small, as jobs leave it.
    Index("ix_jobs_waiting", "provider", "created_at", "id",
          postgresql_where=text(WAITING), sqlite_where=text(WAITING)),
    # The sweeper's deadline pass: only live jobs with a deadline are in it.
    Index("ix_jobs_cancel_after", "cancel_after",
          postgresql_where=text(DEADLINED), sqlite_where=text(DEADLINED)),
)

job_dispatches = Table(
    "job_dispatches",
    metadata,
    Column("job_id", Uuid, ForeignKey("jobs.id"), primary_key=True),
    Column("queue", Text, nullable=False),
    _now(),
    _ts("sent_at"),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Index("ix_job_dispatches_unsent", "sent_at", "created_at"),
)

TRANSACTION_TYPES = ("deposit", "reservation", "debit", "release", "refund")

transactions = Table(
    "transactions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("wallet_id", Uuid, ForeignKey("wallets.id"), nullable=False),
    Column("job_id", Uuid, ForeignKey("jobs.id")),
    Column("type", Text, nullable=False),
    Column("amount", Credits, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'posted'")),
    Column("idempotency_key", Text, nullable=False),
    Column("reference_id", Uuid),
    Column("metadata", Json, nullable=False, server_default=text("'{}'")),
    _now(),
    _ts("updated_at", required=True),
    UniqueConstraint("idempotency_key", name="uq_transactions_idempotency_key"),
    CheckConstraint(
        "type IN ('deposit', 'reservation', 'debit', 'release', 'refund')",
        name="ck_transactions_type",
    ),
    CheckConstraint("amount > 0", name="ck_transactions_amount_positive"),
    Index("ix_transactions_wallet_created", "wallet_id", "created_at"),
    Index("ix_transactions_job", "job_id"),
)

credit_holds = Table(
    "credit_holds",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("wallet_id", Uuid, ForeignKey("wallets.id"), nullable=False),
    Column("job_id", Uuid, ForeignKey("jobs.id"), nullable=False),
    Column("amount", Credits, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'open'")),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    _now(),
    _ts("closed_at"),
    UniqueConstraint("job_id", name="uq_credit_holds_job"),
    CheckConstraint("status IN ('open', 'settled', 'voided')", name="ck_credit_holds_status"),
    CheckConstraint("amount >= 0", name="ck_credit_holds_amount_nonneg"),
    Index("ix_credit_holds_status_expires", "status", "expires_at"),
)

media_assets = Table(
    "media_assets",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("job_id", Uuid, ForeignKey("jobs.id"), nullable=False),
    Column("content_type", Text, nullable=False),
    Column("storage_key", Text, nullable=False),
    Column("mime_type", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("metadata", Json, nullable=False, server_default=text("'{}'")),
    _now(),
    UniqueConstraint("job_id", name="uq_media_assets_job"),
    Index("ix_media_assets_company", "company_id"),
)

api_usage = Table(
    "api_usage",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("job_id", Uuid, ForeignKey("jobs.id"), nullable=False),
    Column("provider", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("usage", Json, nullable=False, server_default=text("'{}'")),
    Column("cost", Credits, nullable=False),
    Column("metadata", Json, nullable=False, server_default=text("'{}'")),
    _now(),
    UniqueConstraint("job_id", name="uq_api_usage_job"),
    Index("ix_api_usage_company_created", "company_id", "created_at"),
    Index("ix_api_usage_created", "created_at"),
)

provider_keys = Table(
    "provider_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("provider", Text, nullable=False),
    Column("key_data", Text, nullable=False),
    Column("fingerprint", Text, nullable=False),
    _now(),
    _ts("updated_at", required=True),
    UniqueConstraint("company_id", "provider", name="uq_provider_keys_company_provider"),
)

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

logs = Table(
    "logs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("level", Text, nullable=False),
    Column("service", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("job_id", Uuid),
    Column("user_id", Uuid),
    Column("company_id", Uuid),
    Column("provider", Text),
    Column("content_type", Text),
    Column("error", Text),
    Column("metadata", Json, nullable=False, server_default=text("'{}'")),
    Column("timestamp", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        "level IN ('debug', 'info', 'warn', 'error', 'critical')", name="ck_logs_level"
    ),
    Index("ix_logs_job", "job_id"),
    Index("ix_logs_timestamp", "timestamp"),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Text, nullable=False),
    Column("value", Double, nullable=False),
    Column("labels", Json, nullable=False, server_default=text("'{}'")),
    Column("job_id", Uuid),
    Column("timestamp", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_metrics_name_timestamp", "name", "timestamp"),
    Index("ix_metrics_timestamp", "timestamp"),
    Index("ix_metrics_job", "job_id"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("key", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'in_flight'")),
    Column("response_status", Integer),
    Column("response_body", Json),
    _now(),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # The claim of the request running with the key: its token, and when it lapses.
    Column("lease_token", Text),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("job_id", Uuid),
    PrimaryKeyConstraint("company_id", "key", name="pk_idempotency_keys"),
    CheckConstraint("status IN ('in_flight', 'done')", name="ck_idempotency_keys_status"),
    Index("ix_idempotency_keys_expires", "expires_at"),
)

budgets = Table(
    "budgets",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("scope", Text, nullable=False, server_default=text("'company'")),
    Column("subject", Text, nullable=False, server_default=text("''")),
    Column("period", Text, nullable=False),
    Column("cap", Credits, nullable=False),
    _now(),
    _ts("updated_at", required=True),
    UniqueConstraint("company_id", "scope", "subject", "period", name="uq_budgets_subject"),
    CheckConstraint("scope IN ('company', 'user', 'api_key')", name="ck_budgets_scope"),
    CheckConstraint("period IN ('day', 'month')", name="ck_budgets_period"),
    CheckConstraint("cap >= 0", name="ck_budgets_cap_nonneg"),
)

job_attempts = Table(
    "job_attempts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("job_id", Uuid, ForeignKey("jobs.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("provider", Text, nullable=False),
    Column("remote_id", Text),
    Column("outcome", Text),
    Column("error_code", Text),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    _ts("finished_at"),
    UniqueConstraint("job_id", "number", name="uq_job_attempts_job_number"),
)

provider_leases = Table(
    "provider_leases",
    metadata,
    Column("resource", Text, primary_key=True),
    Column("job_id", Uuid),
    _ts("expires_at"),
    _ts("updated_at", required=True),
)

provider_circuits = Table(
    "provider_circuits",
    metadata,
    Column("provider", Text, primary_key=True),
    Column("consecutive_failures", Integer, nullable=False, server_default=text("0")),
    _ts("opened_until"),
    _ts("updated_at", required=True),
)

# Revision 0006: signed webhooks (pipeline/webhooks.py).
WEBHOOK_PENDING = "status = 'pending'"

# Each company's signing secrets as Fernet ciphertext: the current one, and the previous
# one until previous_expires_at (a rotation's grace period, when both sign).
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("company_id", Uuid, ForeignKey("companies.id"), primary_key=True),
    Column("secret_data", Text, nullable=False),
    Column("previous_data", Text),
    _ts("previous_expires_at"),
    _now(),
    _ts("rotated_at"),
)

# One row per job event to send: written with the job's change (an outbox), then the
# delivery's log (attempts, last answer). `sequence` is the progress step (0 otherwise):
# the unique key is what keeps a job to one webhook per event and per tenth of progress.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Uuid, primary_key=True),  # the webhook-id header is msg_<its hex>
    Column("job_id", Uuid, ForeignKey("jobs.id"), nullable=False),
    Column("company_id", Uuid, ForeignKey("companies.id"), nullable=False),
    Column("event", Text, nullable=False),
    Column("sequence", Integer, nullable=False, server_default=text("0")),
    Column("url", Text, nullable=False),
    Column("payload", Json),  # the body of the latest attempt
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    _ts("next_attempt_at"),
    Column("claim_token", Text),  # the relay's claim on the attempt in flight
    Column("last_status_code", Integer),
    Column("last_error", Text),
    _now(),
    _ts("updated_at", required=True),
    _ts("last_attempt_at"),
    _ts("delivered_at"),
    UniqueConstraint("job_id", "event", "sequence", name="uq_webhook_deliveries_job_event"),
    CheckConstraint("status IN ('pending', 'delivered', 'failed')",
                    name="ck_webhook_deliveries_status"),
    Index("ix_webhook_deliveries_due", "next_attempt_at",
          postgresql_where=text(WEBHOOK_PENDING), sqlite_where=text(WEBHOOK_PENDING)),
)
