"""The two seed APIs, kept working for their existing clients.

Seed 000: POST /api/generate, GET /api/preview/<jobId>.
Seed 002: POST /functions/v1/media-start, GET /functions/v1/media-status?jobId=.
Both run the same use cases as /v1, `Idempotency-Key` included; only the shapes differ.
"""

from __future__ import annotations

from flask import Blueprint, request

from api.auth import current_principal
from api.idempotency import idempotent
from api.jobs import load_job_view, submit
from pipeline.errors import Forbidden, ValidationFailed
from pipeline.jobs import JobRequest

blp = Blueprint("seed", __name__)

MEDIA_TYPES = ("image", "video", "audio")
# Seed 002's params that are provider settings (the prompt is taken out separately).
MEDIA_SETTINGS = ("duration", "voice", "style", "width", "height", "size", "model")


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationFailed("The request body must be a JSON object.")
    return body


def _number(value: str | None):
    # The seeds document costs as JSON numbers; they are exact decimals in the ledger.
    return None if value is None else float(value)


@blp.post("/api/generate")
def generate():
    body = _json_body()

    def run():
        settings = body.get("settings", {})
        job = submit(JobRequest(
            content_type=body.get("contentType"),
            prompt=body.get("prompt"),
            settings=settings if settings is not None else {},
            provider=body.get("providerName") or body.get("provider"),
            source="api.generate",
        ))
        return {"jobId": str(job["id"]), "status": "accepted",
                "estimatedCost": _number(str(job["estimated_cost"]))}, 202, {}

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
    body = _json_body()
    return idempotent("POST /functions/v1/media-start", body, lambda: _media_start(body))


def _media_start(body: dict):
    principal = current_principal()
    company = body.get("companyId")
    if company is not None and str(company) != str(principal.company_id):
        raise Forbidden("companyId does not match the company of this API key.")
    job_type = body.get("jobType")
    if job_type not in MEDIA_TYPES:
        raise ValidationFailed(f"Unknown jobType '{job_type}'.",
                               details={"field": "jobType", "allowed": list(MEDIA_TYPES)})
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise ValidationFailed("params must be a JSON object.", details={"field": "params"})
    prompt = params.get("prompt") or params.get("text")
    settings = {k: params[k] for k in MEDIA_SETTINGS if k in params}
    job = submit(JobRequest(content_type=job_type, prompt=prompt, settings=settings,
                            provider=body.get("provider"), source="media-start"))
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
