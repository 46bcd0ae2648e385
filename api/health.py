"""/healthz: the process is up. /readyz: its database and broker answer, each one shown."""

from __future__ import annotations

from flask import current_app
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from pipeline import status

blp = Blueprint("health", __name__, description="Liveness and readiness, without a key.")


class Alive(Schema):
    status = fields.String(validate=validate.OneOf(("ok",)))


class Check(Schema):
    ok = fields.Boolean()
    ms = fields.Float(metadata={"description": "How long the check took"})
    error = fields.String(metadata={"description": "Why it failed (absent when ok)"})


class Readiness(Schema):
    status = fields.String(validate=validate.OneOf(("ready", "unavailable")))
    checks = fields.Dict(keys=fields.String(), values=fields.Nested(Check), metadata={
        "description": "`database` and `broker`, each with `ok`, `ms` and maybe `error`"})


@blp.get("/healthz")
@blp.alt_response(200, schema=Alive, description="The process is up")
def healthz():
    """Liveness, with no I/O: a database or broker outage never gets a healthy API restarted."""
    return {"status": "ok"}


@blp.get("/readyz")
@blp.alt_response(200, schema=Readiness, description="The database and the broker answer")
@blp.alt_response(503, schema=Readiness,
                  description="One of them does not: the same body, naming it (not the "
                              "error envelope)")
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
