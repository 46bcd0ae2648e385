-- Content pipeline schema (PostgreSQL) at the newest migration, for reading. Databases are
-- made and upgraded by the migrations in pipeline/migrations/ (`pipeline db upgrade`), never
-- from this file; tests/test_migrations.py fails when a migrated database, this file or
-- pipeline/tables.py (the models) differ. Columns added after the first release sit at the
-- end of their table, where the migrations put them.
-- Credits are NUMERIC(20,6): exact decimals, never floats.

CREATE TABLE companies (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    email TEXT,
    name TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_users_company ON users (company_id);

-- Keys are stored as SHA-256 of the secret; the prefix lets people tell keys apart.
CREATE TABLE api_keys (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    user_id UUID REFERENCES users (id),
    name TEXT NOT NULL DEFAULT '',
    prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    scope TEXT NOT NULL DEFAULT 'client',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ,
    CONSTRAINT uq_api_keys_hash UNIQUE (key_hash),
    CONSTRAINT ck_api_keys_scope CHECK (scope IN ('client', 'admin'))
);
CREATE INDEX ix_api_keys_company ON api_keys (company_id);

-- One wallet per company. available + held + used only ever move together with a
-- transaction row (invariant 2), and none of them may go below zero (invariant 1).
CREATE TABLE wallets (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    user_id UUID REFERENCES users (id),
    credits_available NUMERIC(20, 6) NOT NULL DEFAULT 0,
    credits_held NUMERIC(20, 6) NOT NULL DEFAULT 0,
    credits_used NUMERIC(20, 6) NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_wallets_company UNIQUE (company_id),
    CONSTRAINT ck_wallets_available_nonneg CHECK (credits_available >= 0),
    CONSTRAINT ck_wallets_held_nonneg CHECK (credits_held >= 0),
    CONSTRAINT ck_wallets_used_nonneg CHECK (credits_used >= 0)
);

-- Seed 000's provider table: one row per provider, prices in credits per usage unit.
CREATE TABLE providers (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    content_types JSONB NOT NULL DEFAULT '[]',
    enabled BOOLEAN NOT NULL DEFAULT true,
    pricing JSONB NOT NULL DEFAULT '{}',
    config JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_providers_name UNIQUE (name)
);

-- Seed 000's jobs, which also serve as seed 002's media_projects (the job queue).
CREATE TABLE jobs (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    user_id UUID REFERENCES users (id),
    api_key_id UUID REFERENCES api_keys (id),
    provider_id UUID REFERENCES providers (id),
    transaction_id UUID,
    provider TEXT NOT NULL,
    content_type TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    source TEXT NOT NULL DEFAULT 'v1',
    prompt TEXT NOT NULL,
    settings JSONB NOT NULL DEFAULT '{}',
    result JSONB,
    preview TEXT,
    output_key TEXT,
    output JSONB,
    remote_id TEXT,
    progress DOUBLE PRECISION,
    error TEXT,
    error_code TEXT,
    estimated_cost NUMERIC(20, 6) NOT NULL,
    actual_cost NUMERIC(20, 6),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    queued_at TIMESTAMPTZ,
    reserved_at TIMESTAMPTZ,
    started_at TIMESTAMPTZ,
    heartbeat_at TIMESTAMPTZ,
    stored_at TIMESTAMPTZ,
    settled_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    -- Revision 0002. The caller named the provider, so the job never runs elsewhere:
    provider_pinned BOOLEAN NOT NULL DEFAULT false,
    -- when a released job's scheduled retry or poll is due (the sweeper waits for it):
    wake_at TIMESTAMPTZ,
    -- when the provider's remote work must be done, or be cancelled:
    deadline_at TIMESTAMPTZ,
    -- Revision 0005. The client's deadline (Cancel-After): cancelled if not done by then:
    cancel_after TIMESTAMPTZ,
    cancelled_at TIMESTAMPTZ,
    -- who asked: "API key <id>", or "deadline":
    cancelled_by TEXT,
    -- where this job's events are sent, and which of them (NULL: every event):
    webhook_url TEXT,
    webhook_events JSONB,
    CONSTRAINT ck_jobs_content_type CHECK (content_type IN ('text', 'image', 'audio', 'video')),
    CONSTRAINT ck_jobs_status CHECK (
        status IN ('pending', 'queued', 'processing', 'completed', 'failed', 'cancelled')
    ),
    CONSTRAINT ck_jobs_estimated_cost_nonneg CHECK (estimated_cost >= 0),
    CONSTRAINT ck_jobs_actual_cost_nonneg CHECK (actual_cost >= 0)
);
CREATE INDEX ix_jobs_company_created ON jobs (company_id, created_at);
-- The sweeper's scans: jobs by status and age of their last sign of life.
CREATE INDEX ix_jobs_status_heartbeat ON jobs (status, heartbeat_at);
-- The list filtered by status, newest first, within one company.
CREATE INDEX ix_jobs_company_status_created ON jobs (company_id, status, created_at);
-- Queue positions: the waiting jobs of a provider in order; small, as jobs leave it.
CREATE INDEX ix_jobs_waiting ON jobs (provider, created_at, id)
    WHERE status IN ('pending', 'queued');
-- The sweeper's deadline pass: only live jobs with a deadline are in it.
CREATE INDEX ix_jobs_cancel_after ON jobs (cancel_after)
    WHERE cancel_after IS NOT NULL AND status IN ('pending', 'queued', 'processing');

-- The outbox: written with the job in one transaction, relayed to the broker after.
CREATE TABLE job_dispatches (
    job_id UUID PRIMARY KEY REFERENCES jobs (id),
    queue TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX ix_job_dispatches_unsent ON job_dispatches (sent_at, created_at);

-- Append-only ledger. idempotency_key (reserve:<job>, debit:<job>, ...) makes every
-- money move happen at most once, whatever the number of deliveries.
CREATE TABLE transactions (
    id UUID PRIMARY KEY,
    wallet_id UUID NOT NULL REFERENCES wallets (id),
    job_id UUID REFERENCES jobs (id),
    type TEXT NOT NULL,
    amount NUMERIC(20, 6) NOT NULL,
    status TEXT NOT NULL DEFAULT 'posted',
    idempotency_key TEXT NOT NULL,
    reference_id UUID,
    metadata JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_transactions_idempotency_key UNIQUE (idempotency_key),
    CONSTRAINT ck_transactions_type CHECK (
        type IN ('deposit', 'reservation', 'debit', 'release', 'refund')
    ),
    CONSTRAINT ck_transactions_amount_positive CHECK (amount > 0)
);
CREATE INDEX ix_transactions_wallet_created ON transactions (wallet_id, created_at);
CREATE INDEX ix_transactions_job ON transactions (job_id);

-- The hold of each job (at most one: invariant 3), closed exactly once.
CREATE TABLE credit_holds (
    id UUID PRIMARY KEY,
    wallet_id UUID NOT NULL REFERENCES wallets (id),
    job_id UUID NOT NULL REFERENCES jobs (id),
    amount NUMERIC(20, 6) NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    expires_at TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at TIMESTAMPTZ,
    CONSTRAINT uq_credit_holds_job UNIQUE (job_id),
    CONSTRAINT ck_credit_holds_status CHECK (status IN ('open', 'settled', 'voided')),
    CONSTRAINT ck_credit_holds_amount_nonneg CHECK (amount >= 0)
);
CREATE INDEX ix_credit_holds_status_expires ON credit_holds (status, expires_at);

-- Seed 002: completed media files, one per job.
CREATE TABLE media_assets (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    job_id UUID NOT NULL REFERENCES jobs (id),
    content_type TEXT NOT NULL,
    storage_key TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_media_assets_job UNIQUE (job_id)
);
CREATE INDEX ix_media_assets_company ON media_assets (company_id);

-- Seed 002: usage and cost per job, written when the job is settled.
CREATE TABLE api_usage (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    job_id UUID NOT NULL REFERENCES jobs (id),
    provider TEXT NOT NULL,
    content_type TEXT NOT NULL,
    usage JSONB NOT NULL DEFAULT '{}',
    cost NUMERIC(20, 6) NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_api_usage_job UNIQUE (job_id)
);
CREATE INDEX ix_api_usage_company_created ON api_usage (company_id, created_at);
CREATE INDEX ix_api_usage_created ON api_usage (created_at);

-- Seed 002: per-company provider keys, encrypted at rest (key_data is ciphertext).
CREATE TABLE provider_keys (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    provider TEXT NOT NULL,
    key_data TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_provider_keys_company_provider UNIQUE (company_id, provider)
);

-- Seed 000: structured operational log.
CREATE TABLE logs (
    id UUID PRIMARY KEY,
    level TEXT NOT NULL,
    service TEXT NOT NULL,
    message TEXT NOT NULL,
    job_id UUID,
    user_id UUID,
    company_id UUID,
    provider TEXT,
    content_type TEXT,
    error TEXT,
    metadata JSONB NOT NULL DEFAULT '{}',
    timestamp TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ck_logs_level CHECK (level IN ('debug', 'info', 'warn', 'error', 'critical'))
);
CREATE INDEX ix_logs_job ON logs (job_id);
CREATE INDEX ix_logs_timestamp ON logs (timestamp);

-- Seed 000: recorded measurements (Prometheus carries the live ones).
CREATE TABLE metrics (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    labels JSONB NOT NULL DEFAULT '{}',
    job_id UUID,
    timestamp TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_metrics_name_timestamp ON metrics (name, timestamp);
CREATE INDEX ix_metrics_timestamp ON metrics (timestamp);
CREATE INDEX ix_metrics_job ON metrics (job_id);

-- Idempotency-Key on job creation (Stripe semantics), scoped to the company.
CREATE TABLE idempotency_keys (
    company_id UUID NOT NULL REFERENCES companies (id),
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'in_flight',
    response_status INTEGER,
    response_body JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    -- Revision 0003. The claim of the request running with the key (a lease that lapses
    -- in seconds), and the job the key made, written in the job's own transaction.
    lease_token TEXT,
    lease_expires_at TIMESTAMPTZ,
    job_id UUID,
    CONSTRAINT pk_idempotency_keys PRIMARY KEY (company_id, key),
    CONSTRAINT ck_idempotency_keys_status CHECK (status IN ('in_flight', 'done'))
);
CREATE INDEX ix_idempotency_keys_expires ON idempotency_keys (expires_at);

-- Spending caps per period (calendar day or month, UTC) for a company, a user or a key.
-- subject is '' for the whole company, else the user's or the key's id.
CREATE TABLE budgets (
    id UUID PRIMARY KEY,
    company_id UUID NOT NULL REFERENCES companies (id),
    scope TEXT NOT NULL DEFAULT 'company',
    subject TEXT NOT NULL DEFAULT '',
    period TEXT NOT NULL,
    cap NUMERIC(20, 6) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_budgets_subject UNIQUE (company_id, scope, subject, period),
    CONSTRAINT ck_budgets_scope CHECK (scope IN ('company', 'user', 'api_key')),
    CONSTRAINT ck_budgets_period CHECK (period IN ('day', 'month')),
    CONSTRAINT ck_budgets_cap_nonneg CHECK (cap >= 0)
);

-- Every provider attempt of a job: which provider ran, and how it ended.
CREATE TABLE job_attempts (
    id UUID PRIMARY KEY,
    job_id UUID NOT NULL REFERENCES jobs (id),
    number INTEGER NOT NULL,
    provider TEXT NOT NULL,
    remote_id TEXT,
    outcome TEXT,
    error_code TEXT,
    error TEXT,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    CONSTRAINT uq_job_attempts_job_number UNIQUE (job_id, number)
);

-- Revision 0002. One running job per instance of a multi-instance provider (a ComfyUI
-- GPU) across every worker and machine: a row per instance, taken by a conditional UPDATE,
-- renewed by the holder's heartbeat, free again when released or past its expiry.
CREATE TABLE provider_leases (
    resource TEXT PRIMARY KEY,
    job_id UUID,
    expires_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Per-provider circuit breaker, shared by every worker through the database.
-- A multi-instance provider has one per instance too, keyed "<provider>@<instance>".
CREATE TABLE provider_circuits (
    provider TEXT PRIMARY KEY,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    opened_until TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Revision 0006. Each company's webhook signing secrets (Fernet ciphertext): the current
-- one, and the previous one until previous_expires_at (a rotation's grace period).
CREATE TABLE webhook_secrets (
    company_id UUID PRIMARY KEY REFERENCES companies (id),
    secret_data TEXT NOT NULL,
    previous_data TEXT,
    previous_expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotated_at TIMESTAMPTZ
);

-- Revision 0006. One row per job event to send to the job's webhook, written in the
-- transaction that changed the job (an outbox), then its delivery log. sequence is the
-- progress step (0 for other events): one webhook per event and per tenth of progress.
CREATE TABLE webhook_deliveries (
    id UUID PRIMARY KEY,
    job_id UUID NOT NULL REFERENCES jobs (id),
    company_id UUID NOT NULL REFERENCES companies (id),
    event TEXT NOT NULL,
    sequence INTEGER NOT NULL DEFAULT 0,
    url TEXT NOT NULL,
    payload JSONB,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ,
    claim_token TEXT,
    last_status_code INTEGER,
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_attempt_at TIMESTAMPTZ,
    delivered_at TIMESTAMPTZ,
    CONSTRAINT uq_webhook_deliveries_job_event UNIQUE (job_id, event, sequence),
    CONSTRAINT ck_webhook_deliveries_status CHECK (status IN ('pending', 'delivered', 'failed'))
);
-- The relay's scan for due deliveries; only pending ones are in it.
CREATE INDEX ix_webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
