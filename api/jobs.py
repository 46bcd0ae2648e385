"""/v1/jobs: submit a generation job, read one, list the company's recent ones."""

from __future__ import annotations

import uuid

from flask import current_app, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from api import schemas
from api.auth import current_principal
from api.idempotency import IDEMPOTENCY_KEY_DOC, Respond, ViewResult, idempotent, on_job_created
from pipeline import jobs as jobs_uc
from pipeline.errors import NotFound
from pipeline.tables import jobs as jobs_table

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
                             on_created=on_job_created(respond))
    queued = jobs_uc.dispatch(rt.engine, rt.publisher, job["id"],
                              rt.registry.queue_for(job["provider"]))
    job["status"] = "queued" if queued else "pending"
    return respond(job, queued)


def parse_job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound("JOB_NOT_FOUND", "No such job.", details={"jobId": value}) from None


def load_job_view(job_id: str) -> dict:
    rt = runtime()
    with rt.engine.connect() as conn:
        job = jobs_uc.get_job(conn, parse_job_id(job_id), current_principal().company_id)
    return jobs_uc.job_view(job, rt.storage, rt.settings.link_ttl_seconds)


def _location(accepted: dict) -> dict:
    return {"Location": url_for("jobs.JobById", job_id=accepted["jobId"])}


def _replay_location(replay) -> dict:
    return _location(replay.body) if replay.status == 202 else {}


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(schemas.JobCreate)
    @blp.response(202, schemas.JobAccepted)
    @blp.doc(parameters=[IDEMPOTENCY_KEY_DOC])
    @blp.alt_response(400, schema=schemas.ErrorEnvelope, description="Invalid request")
    @blp.alt_response(401, schema=schemas.ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(402, schema=schemas.ErrorEnvelope,
                      description="INSUFFICIENT_CREDITS: the wallet cannot cover the estimate")
    @blp.alt_response(409, schema=schemas.ErrorEnvelope,
                      description="IDEMPOTENCY_IN_FLIGHT: a request with this key is running")
    @blp.alt_response(422, schema=schemas.ErrorEnvelope,
                      description="IDEMPOTENCY_KEY_REUSED: the key came with another body")
    def post(self, body):
        """Submit a generation job.

        The company and user come from the API key. The response carries the job id to
        poll and the estimated cost in credits, which is held on the wallet while the
        job runs; the actual cost (never above the estimate) is charged at the end.
        Send an `Idempotency-Key` header to make retries safe: see its description.
        """
        req = jobs_uc.JobRequest(
            content_type=body["contentType"],
            prompt=body["prompt"],
            settings=body["settings"],
            provider=body.get("providerName") or body.get("provider"),
        )

        def accepted(job: dict, queued: bool):
            view = {"jobId": str(job["id"]), "status": "queued" if queued else "pending",
                    "estimatedCost": str(job["estimated_cost"])}
            return view, 202, _location(view)

        return idempotent("POST /v1/jobs", body, lambda: submit(req, accepted),
                          replay_headers=_replay_location)

    @blp.arguments(schemas.JobListQuery, location="query")
    @blp.response(200, schemas.JobList)
    def get(self, query):
        """List this company's most recent jobs, newest first."""
        rt = runtime()
        stmt = (select(jobs_table)
                .where(jobs_table.c.company_id == current_principal().company_id)
                .order_by(jobs_table.c.created_at.desc())
                .limit(query["limit"]))
        if query["status"]:
            stmt = stmt.where(jobs_table.c.status == query["status"])
        with rt.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return {"jobs": [jobs_uc.job_view(r, rt.storage, rt.settings.link_ttl_seconds)
                         for r in rows]}


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
