"""/v1/jobs/<id>/attempts: a job's attempt log, each start on a provider and its end."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from api.auth import current_principal
from api.docs import errors
from api.jobs import parse_job_id, runtime
from api.schemas import ErrorEnvelope
from pipeline import attempts as attempts_uc

blp = Blueprint("attempts", __name__, url_prefix="/v1/jobs",
                description="A job's attempt log: which provider was tried, and how it ended.")

OUTCOMES = ("succeeded", "transient", "failed", "timeout", "abandoned")


class AttemptError(Schema):
    code = fields.String(allow_none=True, metadata={
        "description": "A stable code, e.g. PROVIDER_UNAVAILABLE, PROVIDER_TIMEOUT"})
    message = fields.String(allow_none=True, metadata={
        "description": "What the provider's answer said, in short; null when none"})


class Attempt(Schema):
    number = fields.Integer(metadata={"description": "1 for the first start, counting "
                                                     "every provider the job was tried on"})
    provider = fields.String()
    outcome = fields.String(allow_none=True, metadata={
        "enum": [*OUTCOMES, None],
        "description": "succeeded; transient (retried later, or on the next provider); "
                       "failed (refused: not retried); timeout (past the provider's "
                       "deadline); abandoned (the job ended elsewhere, e.g. cancelled); "
                       "null while the attempt runs, or when its end was never heard "
                       "(a worker stopped mid-call and the job was started again, or "
                       "the start was one over MAX_ATTEMPTS and the job failed)"})
    error = fields.Nested(AttemptError, allow_none=True)
    startedAt = fields.String()
    finishedAt = fields.String(allow_none=True, metadata={
        "description": "null when `outcome` is"})


class AttemptList(Schema):
    attempts = fields.List(fields.Nested(Attempt))


@blp.route("/<job_id>/attempts")
class JobAttempts(MethodView):
    @blp.response(200, AttemptList)
    @blp.alt_response(401, schema=ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(404, schema=ErrorEnvelope, description="JOB_NOT_FOUND")
    @errors("JOB_NOT_FOUND")
    def get(self, job_id):
        """The job's attempt log: each start on a provider, first to last.

        A job that waits has none yet; one retried after a provider's hiccup, or moved
        on to the next provider, has one per start. `GET /v1/jobs/<id>`'s `attempts` is
        their count. Any key of the job's company may read it; another company's job is
        not found. Provider credentials, raw responses and remote ids are never shown.
        """
        with runtime().engine.connect() as conn:
            return {"attempts": attempts_uc.list_attempts(
                conn, parse_job_id(job_id), current_principal().company_id)}
