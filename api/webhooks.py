"""/v1/webhooks: the company's signing secret (read, rotate); /v1/jobs/<id>/deliveries: a
job's webhook delivery log."""

from __future__ import annotations

from datetime import timedelta

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from api.auth import current_principal, require_admin
from api.docs import errors
from api.gate import admin_only
from api.jobs import parse_job_id, runtime
from api.schemas import ErrorEnvelope
from pipeline import provider_keys, webhook_secrets, webhooks

blp = Blueprint(
    "webhooks", __name__, url_prefix="/v1",
    description="Signed webhooks: the secret that signs them (admin keys only) and each "
                "job's delivery log. A job's webhook is set when it is submitted "
                "(`webhook`, `webhookEvents` on `POST /v1/jobs`).",
)


class WebhookSecret(Schema):
    secret = fields.String(metadata={
        "description": "`whsec_` and base64: give it to `standardwebhooks.Webhook(secret)` "
                       "to verify what we send"})
    createdAt = fields.String(metadata={"description": "When the company's first secret "
                                                       "was made"})
    rotatedAt = fields.String(allow_none=True, metadata={
        "description": "When it was last rotated; null if never"})
    previousExpiresAt = fields.String(allow_none=True, metadata={
        "description": "Until then the previous secret signs too (a second signature in "
                       "`webhook-signature`); null when only this one signs"})


class Delivery(Schema):
    webhookId = fields.String(metadata={
        "description": "The `webhook-id` header: the same on every attempt"})
    event = fields.String(metadata={"description": ", ".join(webhooks.EVENTS)})
    type = fields.String(metadata={"description": "The payload's `type`, e.g. job.completed"})
    status = fields.String(metadata={"description": "pending, delivered or failed"})
    attempts = fields.Integer()
    lastResponseStatus = fields.Integer(allow_none=True, metadata={
        "description": "The HTTP status of the last answer; null if none came"})
    lastError = fields.String(allow_none=True, metadata={
        "description": "Why the last attempt failed, in words; null after a success"})
    createdAt = fields.String()
    lastAttemptAt = fields.String(allow_none=True)
    nextAttemptAt = fields.String(allow_none=True, metadata={
        "description": "When a pending delivery is tried next (about then); null otherwise"})
    deliveredAt = fields.String(allow_none=True)


class DeliveryList(Schema):
    deliveries = fields.List(fields.Nested(Delivery))


def _cipher():
    return provider_keys.cipher(runtime().settings.provider_key_secrets)


@blp.route("/webhooks/secret")
class Secret(MethodView):
    @admin_only
    @blp.response(200, WebhookSecret)
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(403, schema=ErrorEnvelope, description="The API key is not admin-scoped")
    def get(self):
        """The company's webhook signing secret (made now if it has none).

        Every webhook of the company's jobs is signed with it. Admin keys only: whoever
        holds it can forge webhooks that the receiver would accept.
        """
        principal = require_admin()
        with runtime().engine.begin() as conn:
            return webhook_secrets.current(conn, _cipher(), principal.company_id).view()


@blp.route("/webhooks/secret/rotate")
class SecretRotate(MethodView):
    @admin_only
    @blp.response(200, WebhookSecret)
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(403, schema=ErrorEnvelope, description="The API key is not admin-scoped")
    def post(self):
        """Replace the signing secret; the old one keeps signing for a grace period.

        Until `previousExpiresAt` (WEBHOOK_SECRET_GRACE_SECONDS after now, a day by
        default) each webhook carries two signatures, one per secret, so a receiver
        verifying with either accepts it. Rotating again within that period drops the
        oldest secret at once.
        """
        principal = require_admin()
        rt = runtime()
        grace = timedelta(seconds=rt.settings.webhook_secret_grace_seconds)
        with rt.engine.begin() as conn:
            return webhook_secrets.rotate(conn, _cipher(), principal.company_id,
                                          grace=grace).view()


@blp.route("/jobs/<job_id>/deliveries")
class JobDeliveries(MethodView):
    @blp.response(200, DeliveryList)
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(404, schema=ErrorEnvelope, description="JOB_NOT_FOUND")
    @errors("JOB_NOT_FOUND")
    def get(self, job_id):
        """The job's webhook deliveries: one per event sent, oldest first.

        Each shows its attempts, the last answer's status or error, and when it is tried
        next. Any key of the job's company may read it; another company's job is not
        found. Neither the secret nor the body sent is shown.
        """
        with runtime().engine.connect() as conn:
            return {"deliveries": webhooks.delivery_log(
                conn, parse_job_id(job_id), current_principal().company_id)}
