"""/metrics: Prometheus text format, read from the database so every API process agrees."""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from pipeline.tables import job_attempts, jobs, metrics

blp = Blueprint("metrics", __name__)


@blp.get("/metrics")
def export():
    engine = current_app.extensions["runtime"].engine
    registry = CollectorRegistry()
    by_status = Gauge("pipeline_jobs", "Jobs by status", ["status"], registry=registry)
    findings = Gauge("pipeline_ledger_audit_findings",
                     "Findings of the latest ledger audit, per check (0 is clean)", ["check"],
                     registry=registry)
    attempts = Gauge("pipeline_provider_attempts_total",
                     "Provider attempts by outcome and error code; alert on "
                     "code=PROVIDER_QUOTA_EXHAUSTED or PROVIDER_AUTH_FAILED increasing",
                     ["provider", "outcome", "code"], registry=registry)
    last_run = Gauge("pipeline_ledger_audit_last_run_timestamp_seconds",
                     "When the latest ledger audit ran", registry=registry)
    with engine.connect() as conn:
        for status, count in conn.execute(select(jobs.c.status, func.count())
                                          .group_by(jobs.c.status)):
            by_status.labels(status).set(count)
        for provider, outcome, code, count in conn.execute(
                select(job_attempts.c.provider, job_attempts.c.outcome,
                       job_attempts.c.error_code, func.count())
                .group_by(job_attempts.c.provider, job_attempts.c.outcome,
                          job_attempts.c.error_code)):
            attempts.labels(provider, outcome or "running", code or "").set(count)
        latest = conn.execute(select(func.max(metrics.c.timestamp))
                              .where(metrics.c.name == "ledger_audit_findings")).scalar()
        if latest is not None:
            rows = conn.execute(select(metrics.c.labels, metrics.c.value).where(
                metrics.c.name == "ledger_audit_findings", metrics.c.timestamp == latest))
            for labels, value in rows:
                findings.labels(labels.get("check", "")).set(value)
            last_run.set(latest.timestamp())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
