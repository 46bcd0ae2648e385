"""/healthz: the process is up. /readyz: its database and broker answer, each one shown."""

from __future__ import annotations

from flask import Blueprint, current_app

from pipeline import status

blp = Blueprint("health", __name__)


@blp.get("/healthz")
def healthz():
    """Liveness, with no I/O: a database or broker outage never gets a healthy API restarted."""
    return {"status": "ok"}


@blp.get("/readyz")
def readyz():
    """Readiness: 200 when the database and the broker both answer within
    PUBLISH_TIMEOUT_SECONDS, else 503 with the same body, which names what is down:
    `{"status": "ready" | "unavailable", "checks": {"database": {"ok", "ms"[, "error"]},
    "broker": {...}}}`. With the filesystem broker, the broker check is that its folder
    takes a file."""
    runtime = current_app.extensions["runtime"]
    report = status.readiness(runtime.engine, _broker(runtime),
                              timeout=runtime.settings.publish_timeout_seconds)
    return report, 200 if report["status"] == "ready" else 503


def _broker(runtime):
    """The broker the runtime publishes to, through the Celery app of its publisher."""
    app = getattr(runtime.publisher, "app", None)
    if app is None:
        return None
    from tasks.probe import BrokerProbe

    return BrokerProbe(app)
