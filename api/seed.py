"""The two seed APIs, kept working for their existing clients.

Seed 000: POST /api/generate, GET /api/preview/<jobId>.
Seed 002: POST /functions/v1/media-start, GET /functions/v1/media-status?jobId=.
Both run the same use cases as /v1, `Idempotency-Key` included; only the shapes differ.
"""

from __future__ import annotations

from flask import request
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from api.auth import current_principal
from api.docs import errors
from api.idempotency import IDEMPOTENCY_KEY_DOC, idempotent
from api.jobs import load_job_view, runtime, submit
from pipeline import accounts
from pipeline.errors import Forbidden, ValidationFailed
from pipeline.jobs import CONTENT_TYPES, JobRequest

blp = Blueprint("seed", __name__,
                description="The seeds' APIs, kept for their existing clients: the same jobs "
                            "as /v1/jobs in the seeds' shapes. The views parse their own "
                            "bodies; these schemas only document them.")

MEDIA_TYPES = ("image", "video", "audio")
# The fields each seed documents (000's `companyId` is ours: the same check as 002's).
GENERATE_FIELDS = ("userId", "companyId", "contentType", "prompt", "settings",
                   "providerName", "provider")
MEDIA_START_FIELDS = ("companyId", "userId", "jobType", "params", "provider")
# Seed 002's params that are the prompt; every other param is a provider setting.
PROMPT_PARAMS = ("prompt", "text")


def _json_body(allowed: tuple[str, ...]) -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationFailed("The request body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        # As /v1/jobs does: a misspelt field is an error, not a silent default.
        raise ValidationFailed(f"Unknown field '{unknown[0]}'.",
                               details={"field": unknown[0], "allowed": list(allowed)})
    _check_caller(body)
    return body


def _check_caller(body: dict) -> None:
    """`companyId` and `userId`, when sent, must be the API key's own (403 otherwise)."""
    principal = current_principal()
    company = body.get("companyId")
    if company is not None and str(company) != str(principal.company_id):
        raise Forbidden("companyId does not match the company of this API key.")
    user = body.get("userId")
    if user is None:
        return
    if principal.user_id is not None:
        if str(user) != str(principal.user_id):
            raise Forbidden("userId does not match the user of this API key.")
    elif not accounts.user_in_company(runtime().engine, user, principal.company_id):
        raise Forbidden("userId is not a user of the company of this API key.")


_CALLER = ("must be the API key's own when sent (403 `FORBIDDEN` otherwise)")
_SUBMIT_ERRORS = ("FORBIDDEN", "PROVIDER_NOT_CONFIGURED", "INSUFFICIENT_CREDITS",
                  "BUDGET_EXCEEDED", "IDEMPOTENCY_IN_FLIGHT", "IDEMPOTENCY_KEY_REUSED",
                  "PROVIDER_UNAVAILABLE")


class GenerateRequest(Schema):
    """Seed 000's body; a field not listed here is refused (400)."""

    userId = fields.String(allow_none=True, metadata={"description": f"A user id: {_CALLER}"})
    companyId = fields.String(allow_none=True,
                              metadata={"description": f"A company id: {_CALLER}"})
    contentType = fields.String(required=True, validate=validate.OneOf(CONTENT_TYPES))
    prompt = fields.String(required=True, metadata={
        "documents": "prompt",
        "description": "What to generate: at least one visible character, at most "
                       "MAX_PROMPT_LENGTH (default 4000)"})
    settings = fields.Dict(keys=fields.String(), allow_none=True,
                           metadata={"description": "Provider settings"})
    providerName = fields.String(allow_none=True, metadata={
        "documents": "provider", "description": "Optional provider; chosen if absent"})
    provider = fields.String(allow_none=True, metadata={
        "documents": "provider", "description": "Alias of providerName"})


class GenerateAccepted(Schema):
    jobId = fields.String()
    status = fields.String(validate=validate.OneOf(("accepted",)))
    estimatedCost = fields.Float(metadata={"description": "Credits held for the job"})


class PreviewResult(Schema):
    url = fields.String(metadata={"description": "A signed link that expires"})
    metadata = fields.Dict()


class Preview(Schema):
    jobId = fields.String()
    status = fields.String(validate=validate.OneOf(
        ("pending", "processing", "completed", "failed")), metadata={
        "description": "Seed 000's words: queued is `pending`, cancelled is `failed`"})
    contentType = fields.String()
    createdAt = fields.String()
    updatedAt = fields.String()
    result = fields.Nested(PreviewResult, allow_none=True)
    preview = fields.String(allow_none=True)
    error = fields.String(metadata={"description": "Why the job failed (only then)"})


class MediaParams(Schema):
    prompt = fields.String(metadata={"description": "The prompt (or `text`)"})
    text = fields.String(metadata={"description": "The prompt, for audio"})


class MediaStartRequest(Schema):
    """Seed 002's body; a field not listed here is refused (400)."""

    companyId = fields.String(allow_none=True,
                              metadata={"description": f"A company id: {_CALLER}"})
    userId = fields.String(allow_none=True, metadata={"description": f"A user id: {_CALLER}"})
    jobType = fields.String(required=True, validate=validate.OneOf(MEDIA_TYPES))
    params = fields.Nested(MediaParams, allow_none=True, metadata={
        "description": "`prompt` (or `text`), and any other entry is passed to the "
                       "provider as a setting"})
    provider = fields.String(allow_none=True, metadata={"documents": "provider"})


class MediaStarted(Schema):
    success = fields.Boolean()
    jobId = fields.String()
    status = fields.String(validate=validate.OneOf(("queued",)))
    provider = fields.String()
    estimated_cost = fields.Float()
    message = fields.String()


class MediaStatus(Schema):
    success = fields.Boolean()
    jobId = fields.String()
    status = fields.String(validate=validate.OneOf(
        ("queued", "processing", "completed", "failed")), metadata={
        "description": "Seed 002's words: pending is `queued`, cancelled is `failed`"})
    provider = fields.String()
    estimated_cost = fields.Float(allow_none=True)
    actual_cost = fields.Float(allow_none=True)
    asset = fields.Dict(allow_none=True, metadata={
        "description": "The result: `url`, `contentType`, `size`, `metadata`"})
    error = fields.String(allow_none=True)
    created_at = fields.String()
    updated_at = fields.String()


def _body(schema) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _number(value: str | None):
    # The seeds document costs as JSON numbers; they are exact decimals in the ledger.
    return None if value is None else float(value)


@blp.post("/api/generate")
@blp.doc(requestBody=_body(GenerateRequest), parameters=[IDEMPOTENCY_KEY_DOC])
@blp.alt_response(202, schema=GenerateAccepted, description="The job is accepted")
@errors(*_SUBMIT_ERRORS)
def generate():
    """Submit a job (seed 000).

    The same job as `POST /v1/jobs`, in seed 000's shapes; `Idempotency-Key` works the
    same way. Poll it with `GET /api/preview/{jobId}`.
    """
    body = _json_body(GENERATE_FIELDS)

    def run():
        settings = body.get("settings", {})
        return submit(JobRequest(
            content_type=body.get("contentType"),
            prompt=body.get("prompt"),
            settings=settings if settings is not None else {},
            # Absent or null only: a value of another type (0, false) is refused as such.
            provider=body.get("providerName") if body.get("providerName") is not None
            else body.get("provider"),
            source="api.generate",
        ), lambda job, _queued: ({"jobId": str(job["id"]), "status": "accepted",
                                  "estimatedCost": _number(str(job["estimated_cost"]))},
                                 202, {}))

    return idempotent("POST /api/generate", body, run)


_SEED000_STATUS = {"pending": "pending", "queued": "pending", "processing": "processing",
                   "completed": "completed", "failed": "failed", "cancelled": "failed"}


@blp.get("/api/preview/<job_id>")
@blp.alt_response(200, schema=Preview, description="The job, in seed 000's words")
@errors("JOB_NOT_FOUND")
def preview(job_id: str):
    """A job's status and result (seed 000)."""
    view = load_job_view(job_id)
    body = {
        "jobId": view["jobId"],
        "status": _SEED000_STATUS[view["status"]],
        "contentType": view["contentType"],
        "createdAt": view["createdAt"],
        "updatedAt": view["updatedAt"],
        "result": None,
        "preview": view["preview"],
    }
    if view["result"]:
        body["result"] = {"url": view["result"]["url"], "metadata": view["result"]["metadata"]}
    if view["error"]:
        body["error"] = view["error"]["message"]
    return body


@blp.post("/functions/v1/media-start")
@blp.doc(requestBody=_body(MediaStartRequest), parameters=[IDEMPOTENCY_KEY_DOC])
@blp.alt_response(200, schema=MediaStarted, description="The job is queued")
@errors(*_SUBMIT_ERRORS)
def media_start():
    """Submit a job (seed 002).

    The same job as `POST /v1/jobs`, in seed 002's shapes; `Idempotency-Key` works the
    same way. Poll it with `GET /functions/v1/media-status?jobId=`.
    """
    body = _json_body(MEDIA_START_FIELDS)
    return idempotent("POST /functions/v1/media-start", body, lambda: _media_start(body))


def _media_start(body: dict):
    job_type = body.get("jobType")
    if job_type not in MEDIA_TYPES:
        raise ValidationFailed(f"Unknown jobType '{job_type}'.",
                               details={"field": "jobType", "allowed": list(MEDIA_TYPES)})
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise ValidationFailed("params must be a JSON object.", details={"field": "params"})
    prompt = params.get("prompt") or params.get("text")
    settings = {k: v for k, v in params.items() if k not in PROMPT_PARAMS}
    return submit(JobRequest(content_type=job_type, prompt=prompt, settings=settings,
                             provider=body.get("provider"), source="media-start"),
                  _media_started)


# The message names the provider as seed 002 does ("Job queued for ComfyUI processing").
_PROVIDER_TITLES = {"comfyui": "ComfyUI", "runway": "Runway", "heygen": "HeyGen",
                    "elevenlabs": "ElevenLabs", "openai": "OpenAI", "stability": "Stability AI"}


def _media_started(job: dict, _queued: bool):
    # Seed 002 says `queued` for a job the outbox has yet to publish too: it will be.
    title = _PROVIDER_TITLES.get(job["provider"], job["provider"])
    return {
        "success": True,
        "jobId": str(job["id"]),
        "status": "queued",
        "provider": job["provider"],
        "estimated_cost": _number(str(job["estimated_cost"])),
        "message": f"Job queued for {title} processing",
    }, 200, {}


_SEED002_STATUS = {"pending": "queued", "queued": "queued", "processing": "processing",
                   "completed": "completed", "failed": "failed", "cancelled": "failed"}


@blp.get("/functions/v1/media-status")
@blp.doc(parameters=[{"in": "query", "name": "jobId", "required": True,
                      "schema": {"type": "string", "minLength": 1},
                      "description": "The job id that media-start returned"}])
@blp.alt_response(200, schema=MediaStatus, description="The job, in seed 002's words")
@errors("JOB_NOT_FOUND")
def media_status():
    """A job's status, costs and result (seed 002)."""
    job_id = request.args.get("jobId")
    if not job_id:
        raise ValidationFailed("jobId is required.", details={"field": "jobId"})
    view = load_job_view(job_id)
    return {
        "success": True,
        "jobId": view["jobId"],
        "status": _SEED002_STATUS[view["status"]],
        "provider": view["provider"],
        "estimated_cost": _number(view["estimatedCost"]),
        "actual_cost": _number(view["actualCost"]),
        "asset": view["result"],
        "error": view["error"]["message"] if view["error"] else None,
        "created_at": view["createdAt"],
        "updated_at": view["updatedAt"],
    }
