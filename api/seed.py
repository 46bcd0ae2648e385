"""The two seed APIs, kept working for their existing clients.

Seed 000: POST /api/generate, GET /api/preview/<jobId>.
Seed 002: POST /functions/v1/media-start, GET /functions/v1/media-status?jobId=.
Both run the same use cases as /v1, `Idempotency-Key` included; only the shapes differ.
"""

from __future__ import annotations

from flask import Blueprint, request

from api.auth import current_principal
from api.idempotency import idempotent
from api.jobs import load_job_view, runtime, submit
from pipeline import accounts
from pipeline.errors import Forbidden, ValidationFailed
from pipeline.jobs import JobRequest

blp = Blueprint("seed", __name__)

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


def _number(value: str | None):
    # The seeds document costs as JSON numbers; they are exact decimals in the ledger.
    return None if value is None else float(value)


@blp.post("/api/generate")
def generate():
    body = _json_body(GENERATE_FIELDS)

    def run():
        settings = body.get("settings", {})
        return submit(JobRequest(
            content_type=body.get("contentType"),
            prompt=body.get("prompt"),
            settings=settings if settings is not None else {},
            provider=body.get("providerName") or body.get("provider"),
            source="api.generate",
        ), lambda job, _queued: ({"jobId": str(job["id"]), "status": "accepted",
                                  "estimatedCost": _number(str(job["estimated_cost"]))},
                                 202, {}))

    return idempotent("POST /api/generate", body, run)


_SEED000_STATUS = {"pending": "pending", "queued": "pending", "processing": "processing",
                   "completed": "completed", "failed": "failed", "cancelled": "failed"}


@blp.get("/api/preview/<job_id>")
def preview(job_id: str):
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
def media_start():
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


def _media_started(job: dict, _queued: bool):
    # Seed 002 says `queued` for a job the outbox has yet to publish too: it will be.
    return {
        "success": True,
        "jobId": str(job["id"]),
        "status": "queued",
        "provider": job["provider"],
        "estimated_cost": _number(str(job["estimated_cost"])),
        "message": f"Job queued for {job['provider']} processing",
    }, 200, {}


_SEED002_STATUS = {"pending": "queued", "queued": "queued", "processing": "processing",
                   "completed": "completed", "failed": "failed", "cancelled": "failed"}


@blp.get("/functions/v1/media-status")
def media_status():
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
