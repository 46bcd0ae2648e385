"""/metrics: the API processes' own metrics plus gauges read from the database.

Kept out of API-key authentication (api/gate.py): scrapers are operators, not companies.
With METRICS_TOKEN set the view asks for it as a Bearer token; without one it answers
only callers on this machine's loopback (README, Metrics).

The database gauges are read at each scrape by `DatabaseCollector`, every query a
bounded walk of an index, under a statement timeout on PostgreSQL, so a scrape stays
cheap however large the tables grow.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from flask import Response, current_app, request
from flask_smorest import Blueprint
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from pipeline import leases, telemetry
from pipeline.db import aware_utc, utcnow
from pipeline.errors import Forbidden, Unauthorized
from pipeline.tables import credit_holds, job_dispatches, jobs, metrics
from service import metrics as exporter

blp = Blueprint("metrics", __name__, description="Prometheus metrics, for operators.")
log = logging.getLogger("pipeline.metrics")

# No count reads more index entries than this; a gauge at the cap means "at least".
COUNT_CAP = 100_000
STATEMENT_TIMEOUT_MS = 2000
IN_FLIGHT = ("pending", "queued", "processing")


def init_app(app, api) -> None:
    """Serve /metrics, and record this process's events (jobs submitted) from now on."""
    telemetry.install(exporter.recorder())
    app.extensions["metrics_registry"] = exporter.scrape_registry(
        DatabaseCollector(app.extensions["runtime"]))
    api.register_blueprint(blp)


@blp.get("/metrics")
@blp.doc(responses={"200": {
    "description": "The Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def export():
    """Metrics in Prometheus' text format.

    With METRICS_TOKEN set, send it as `Authorization: Bearer <METRICS_TOKEN>` (401
    without it); without one, only callers on this machine's loopback are answered (403
    otherwise). API keys are not used here.
    """
    token = current_app.extensions["runtime"].settings.metrics_token
    if not exporter.may_scrape(request.headers.get("Authorization"), request.remote_addr,
                               token):
        if token:
            raise Unauthorized("Send the metrics token: Authorization: Bearer <METRICS_TOKEN>.")
        raise Forbidden("Without METRICS_TOKEN, /metrics answers only this machine's "
                        "loopback.")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    body = generate_latest(current_app.extensions["metrics_registry"])
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


def _capped(conn, stmt) -> int:
    return conn.execute(select(func.count()).select_from(stmt.limit(COUNT_CAP).subquery())
                        ).scalar_one()


def _instance_label(url: str) -> str:
    """An instance's URL without credentials a URL may carry."""
    parts = urlsplit(url)
    if not parts.hostname:
        return url
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


class DatabaseCollector:
    """Gauges only the database knows, each from an index (schema.sql names them)."""

    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        try:
            families = list(self._read())
        except SQLAlchemyError as exc:
            # The process's own metrics still answer; this says why the rest is missing.
            log.warning("metrics: cannot read the database (%s)", type(exc).__name__)
            families = []
        yield from families
        yield GaugeMetricFamily("pipeline_database_up",
                                "1 when this scrape could read the database's gauges",
                                value=1 if families else 0)

    def _read(self):
        from prometheus_client.core import GaugeMetricFamily

        engine = self.runtime.engine
        now = utcnow()
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
            in_flight = GaugeMetricFamily(
                "pipeline_jobs_in_flight", "Jobs not yet ended, by status",
                labels=["status"])
            # Each count below walks one index: ix_jobs_status_heartbeat, then
            # ix_credit_holds_status_expires, then ix_job_dispatches_unsent.
            for status in IN_FLIGHT:
                in_flight.add_metric([status], _capped(
                    conn, select(jobs.c.id).where(jobs.c.status == status)))
            yield in_flight

            open_holds = (select(credit_holds.c.amount).where(credit_holds.c.status == "open")
                          .limit(COUNT_CAP).subquery())
            count, held = conn.execute(
                select(func.count(), func.coalesce(func.sum(open_holds.c.amount), 0))).one()
            yield GaugeMetricFamily("pipeline_credit_holds_open", "Credit holds still open",
                                    value=count)
            yield GaugeMetricFamily("pipeline_credit_holds_open_credits",
                                    "Credits on open holds", value=float(held))
            yield GaugeMetricFamily(
                "pipeline_credit_holds_expired", "Open holds past their expiry (the sweeper "
                "voids them within seconds: non-zero for long means it is not running)",
                value=_capped(conn, select(credit_holds.c.id).where(
                    credit_holds.c.status == "open", credit_holds.c.expires_at < now)))

            unsent = job_dispatches.c.sent_at.is_(None)
            backlog = _capped(conn, select(job_dispatches.c.created_at).where(unsent))
            oldest = conn.execute(select(job_dispatches.c.created_at).where(unsent)
                                  .order_by(job_dispatches.c.created_at).limit(1)).scalar()
            yield GaugeMetricFamily("pipeline_outbox_backlog",
                                    "Jobs written but not yet handed to the broker",
                                    value=backlog)
            yield GaugeMetricFamily(
                "pipeline_outbox_oldest_age_seconds", "Age of the oldest unsent job (0: none)",
                value=max((now - aware_utc(oldest)).total_seconds(), 0) if oldest else 0)

            yield from self._audit(conn, GaugeMetricFamily)
            yield self._instances(conn, GaugeMetricFamily)

    @staticmethod
    def _audit(conn, family):
        """The latest ledger audit's findings per check (ix_metrics_name_timestamp)."""
        findings = family("pipeline_ledger_audit_findings",
                          "Findings of the latest ledger audit, per check (0 is clean)",
                          labels=["check"])
        last_run = family("pipeline_ledger_audit_last_run_timestamp_seconds",
                          "When the latest ledger audit ran")
        name = metrics.c.name == "ledger_audit_findings"
        latest = conn.execute(select(func.max(metrics.c.timestamp)).where(name)).scalar()
        if latest is not None:
            rows = conn.execute(select(metrics.c.labels, metrics.c.value).where(
                name, metrics.c.timestamp == latest))
            for labels, value in rows:
                findings.add_metric([(labels or {}).get("check", "")], value)
            last_run.add_metric([], aware_utc(latest).timestamp())
        yield findings
        yield last_run

    def _instances(self, conn, family):
        """Which instances of a multi-instance provider (ComfyUI) run a job now."""
        busy = family("pipeline_provider_instance_busy",
                      "1 while an instance of a multi-instance provider (ComfyUI) runs a job, "
                      "0 while it is idle", labels=["provider", "instance"])
        registry = self.runtime.registry
        per_instance = self.runtime.settings.comfyui_prompts_per_instance
        for provider in registry.names():
            instances = registry.instances(provider)
            # An instance is busy while any of its slots is leased (the running prompt's
            # slot may be the second one, its first freed by the job before it).
            held = ({leases.instance_of(slot) for slot in leases.holders(
                conn, leases.slots(instances, per_instance))} if instances else set())
            for instance in instances:
                busy.add_metric([provider, _instance_label(instance)],
                                1 if instance in held else 0)
        return busy
