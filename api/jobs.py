"""/v1/jobs: submit a generation job, read one, list the company's recent ones."""

from __future__ import annotations

import uuid

from flask import current_app, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint

from api import prefer, schemas
from api.auth import current_principal
from api.docs import errors
from api.idempotency import IDEMPOTENCY_KEY_DOC, Respond, ViewResult, idempotent, on_job_created
from pipeline import cancel as cancel_uc
from pipeline import jobs as jobs_uc
from pipeline import lifecycle, listing, netguard
from pipeline.db import autocommit

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs",
                description="Generation jobs: submit, then poll until completed or failed.")


def runtime():
    return current_app.extensions["runtime"]


def submit(req: jobs_uc.JobRequest, respond: Respond) -> ViewResult:
    """Write the job, publish its chain, answer `respond(job, queued)`: shared by /v1 and
    the seed endpoints. Under an Idempotency-Key the answer is stored with the job."""
    rt = runtime()
    job = jobs_uc.submit_job(rt.engine, rt.registry, principal=current_principal(), req=req,
                             max_prompt_length=rt.settings.max_prompt_length,
                             routes=rt.settings.provider_env,
                             on_created=on_job_created(respond),
                             webhook_guard=netguard.Guard(
                                 allow_private=rt.settings.webhook_allow_private))
    # The hold at once, one statement: a job held here runs generate and finish only.
    reserved = rt.settings.hold_at_submit and lifecycle.reserve_if_covered(
        rt.engine, job["id"], ttl_seconds=rt.settings.hold_timeout_seconds)
    queued = jobs_uc.dispatch(rt.engine, rt.publisher, job["id"],
                              rt.registry.queue_for(job["provider"]), reserved=reserved)
    job["status"] = "queued" if queued else "pending"
    return respond(job, queued)


CANCEL_AFTER_DOC = {
    "in": "header",
    "name": cancel_uc.CANCEL_AFTER_HEADER,
    "required": False,
    "schema": {"type": "string",
               "pattern": r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?h)?(\d+(\.\d+)?m)?(\d+(\.\d+)?s)?)\s*$"},
    "description": (
        "A deadline, as Replicate's: if the job is not done this long after it is accepted, "
        "it is cancelled as `POST /v1/jobs/<id>/cancel` would (a job still waiting is "
        "refunded in full; a generating one is stopped at its provider and refunded), "
        "with `cancelledBy: deadline`. A number of seconds (`90`, `7.5`) or hours, "
        "minutes and seconds in that order (`30s`, `5m`, `1h30m`, `1.5h`); between 5 "
        "seconds and 24 hours. The sweeper checks deadlines every SWEEP_INTERVAL_SECONDS "
        "(5 by default), so a job ends that much after its deadline at most. Anything else "
        "is 400 VALIDATION_ERROR with `details.field` `Cancel-After`."),
}


def parse_job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise jobs_uc.job_not_found(value) from None


def load_job_view(job_id: str) -> dict:
    rt = runtime()
    # Reads alone, no BEGIN/ROLLBACK: the queue position is a hint, it need not share the
    # job's snapshot.
    with autocommit(rt.engine) as conn:
        job = jobs_uc.get_job(conn, parse_job_id(job_id), current_principal().company_id)
        position = listing.queue_position(conn, job)
    return jobs_uc.job_view(job, rt.storage, rt.settings.link_ttl_seconds,
                            queue_position=position)


def _location(accepted: dict) -> dict:
    return {"Location": url_for("jobs.JobById", job_id=accepted["jobId"])}


def _replay_location(replay) -> dict:
    return _location(replay.body) if replay.status == 202 else {}


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(schemas.JobCreate)
    @blp.response(202, schemas.JobAccepted)
    @blp.doc(parameters=[IDEMPOTENCY_KEY_DOC, CANCEL_AFTER_DOC, prefer.PREFER_DOC])
    @blp.alt_response(200, schema=schemas.Job, description=(
        "`Prefer: wait=N` and the job ended within N seconds: the job as GET shows it"))
    @blp.alt_response(400, schema=schemas.ErrorEnvelope, description="Invalid request")
    @blp.alt_response(401, schema=schemas.ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(402, schema=schemas.ErrorEnvelope,
                      description="INSUFFICIENT_CREDITS: the wallet cannot cover the estimate")
    @blp.alt_response(409, schema=schemas.ErrorEnvelope,
                      description="IDEMPOTENCY_IN_FLIGHT: a request with this key is running")
    @blp.alt_response(422, schema=schemas.ErrorEnvelope,
                      description="IDEMPOTENCY_KEY_REUSED: the key came with another body")
    @errors("PROVIDER_NOT_CONFIGURED", "INSUFFICIENT_CREDITS", "BUDGET_EXCEEDED",
            "IDEMPOTENCY_IN_FLIGHT", "IDEMPOTENCY_KEY_REUSED", "PROVIDER_UNAVAILABLE")
    def post(self, body):
        """Submit a generation job.

        The company and user come from the API key. The response carries the job id to
        poll and the estimated cost in credits, which is held on the wallet while the
        job runs; the actual cost (never above the estimate) is charged at the end.
        Send an `Idempotency-Key` header to make retries safe: see its description.
        Send `Prefer: wait=N` to get the finished job in this response when it ends
        within N seconds (at most 60): see its description.
        """
        req = jobs_uc.JobRequest(
            content_type=body["contentType"],
            prompt=body["prompt"],
            settings=body["settings"],
            provider=body.get("providerName") or body.get("provider"),
            cancel_after=cancel_uc.parse_cancel_after(
                request.headers.get(cancel_uc.CANCEL_AFTER_HEADER)),
            webhook=body.get("webhook"),
            webhook_events=body.get("webhookEvents"),
        )

        def accepted(job: dict, queued: bool):
            view = {"jobId": str(job["id"]), "status": "queued" if queued else "pending",
                    "estimatedCost": str(job["estimated_cost"])}
            return view, 202, _location(view)

        answer = idempotent("POST /v1/jobs", body, lambda: submit(req, accepted),
                            replay_headers=_replay_location)
        # After the answer is stored: a replay stays the create answer (api/prefer.py).
        return prefer.apply_wait(answer)

    @blp.arguments(schemas.JobListQuery, location="query")
    @blp.response(200, schemas.JobList)
    @blp.alt_response(400, schema=schemas.ErrorEnvelope, description=(
        "VALIDATION_ERROR: a malformed cursor, a date without a timezone, an unknown "
        "status or content type; `details.field` names the parameter"))
    @blp.alt_response(401, schema=schemas.ErrorEnvelope, description="Missing or bad API key")
    def get(self, query):
        """List this company's jobs, newest first, a page at a time.

        Each job is shown as `GET /v1/jobs/<id>` shows it. Filters combine (all must
        hold): `status` (one or several, repeated or comma-separated), `contentType`,
        `provider`, `createdAfter` and `createdBefore` (ISO 8601 with a timezone, both
        exclusive; write `+` in an offset as `%2B`, or use `Z`). For the next page pass
        `nextCursor` back as `cursor` with the same filters; it is null on the last page.
        Jobs submitted while paging appear on no later page, and none repeats.
        """
        rt = runtime()
        after = listing.Cursor.decode(query["cursor"]) if query["cursor"] else None
        filters = listing.JobFilter(
            statuses=query["status"], content_type=query["contentType"],
            provider=query["provider"], created_after=query["createdAfter"],
            created_before=query["createdBefore"])
        with autocommit(rt.engine) as conn:
            rows, next_page = listing.list_jobs(
                conn, current_principal().company_id, limit=query["limit"],
                filters=filters, after=after)
            positions = listing.queue_positions(conn, rows)
        return {
            "jobs": [jobs_uc.job_view(r, rt.storage, rt.settings.link_ttl_seconds,
                                      queue_position=positions.get(r.id)) for r in rows],
            "nextCursor": next_page.encode() if next_page else None,
        }


@blp.route("/<job_id>")
class JobById(MethodView):
    @blp.response(200, schemas.Job)
    @blp.alt_response(404, schema=schemas.ErrorEnvelope, description="JOB_NOT_FOUND")
    def get(self, job_id):
        """A job's status, timestamps, costs, result link and preview.

        `result.url` is a signed link that expires (LINK_TTL_SECONDS, default one hour);
        ask again for a fresh one. Another company's job is reported as not found.
        """
        return load_job_view(job_id)


@blp.route("/<job_id>/cancel")
class JobCancel(MethodView):
    @blp.response(200, schemas.Job)
    @blp.alt_response(401, schema=schemas.ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(404, schema=schemas.ErrorEnvelope, description="JOB_NOT_FOUND")
    @blp.alt_response(409, schema=schemas.ErrorEnvelope, description=(
        "JOB_ALREADY_FINISHED: the job is completed, failed or cancelled, or its result is "
        "already generated; `details.status` is its status"))
    def post(self, job_id):
        """Cancel a job and refund its held credits in full.

        A job that has not reached its provider ends at once. One that is generating ends
        now too; its provider's work is stopped on the worker's next poll (Runway, OpenAI
        video and ComfyUI are stopped at the provider; HeyGen offers no way to stop a
        render and is left to finish unused). Nothing is charged either way. The job's
        status becomes `cancelled`, and `error` says who cancelled it and when:
        `{"code": "CANCELLED", "message": "Cancelled by API key <id> at <time>."}`.
        Any key of the job's company may cancel it; another company's job is not found.
        """
        principal = current_principal()
        rt = runtime()
        job = cancel_uc.cancel_job(rt.engine, parse_job_id(job_id), principal.company_id,
                                   by=f"API key {principal.api_key_id}")
        return jobs_uc.job_view(job, rt.storage, rt.settings.link_ttl_seconds)
