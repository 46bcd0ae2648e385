"""Request and response shapes (marshmallow), which also write the OpenAPI document."""

from __future__ import annotations

from datetime import UTC

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from pipeline.jobs import CONTENT_TYPES
from pipeline.netguard import MAX_URL_LENGTH
from pipeline.webhooks import EVENTS as WEBHOOK_EVENTS


class JobCreate(Schema):
    class Meta:
        unknown = RAISE

    contentType = fields.String(required=True, validate=validate.OneOf(CONTENT_TYPES),
                                metadata={"description": "text, image, audio or video"})
    prompt = fields.String(required=True, metadata={
        "documents": "prompt",  # api/docs.py writes minLength and maxLength from settings
        "description": "What to generate; 1 to MAX_PROMPT_LENGTH (default 4000) characters"})
    settings = fields.Dict(keys=fields.String(), load_default=dict, metadata={
        "description": "Provider settings, e.g. width/height (image), duration (video)"})
    # api/docs.py lists this deployment's providers as the enum (the registry knows them).
    providerName = fields.String(load_default=None, allow_none=True, metadata={
        "documents": "provider", "description": "Optional provider; chosen if absent"})
    provider = fields.String(load_default=None, allow_none=True, metadata={
        "documents": "provider", "description": "Alias of providerName"})
    webhook = fields.String(load_default=None, allow_none=True, validate=validate.Length(
        min=1, max=MAX_URL_LENGTH), metadata={"description": (
            "An https:// (or http://) URL to POST the job's events to, signed the Standard "
            "Webhooks way with the company's secret (`GET /v1/webhooks/secret`). Refused "
            "(400, `details.field` `webhook`) with a user name or password in it, or when "
            "its host resolves to a private, loopback, link-local or metadata address "
            "(unless the operator allows them)")})
    webhookEvents = fields.List(
        fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)), load_default=None,
        allow_none=True, validate=validate.Length(min=1, max=len(WEBHOOK_EVENTS)),
        metadata={"description": "Which events to send: any of " + ", ".join(WEBHOOK_EVENTS)
                                 + "; all of them when absent. Needs `webhook`"})


class JobAccepted(Schema):
    jobId = fields.String()
    status = fields.String()
    estimatedCost = fields.String(metadata={"description": "Credits, exact decimal"})


class JobResult(Schema):
    url = fields.String()
    contentType = fields.String()
    size = fields.Integer()
    metadata = fields.Dict()


class JobError(Schema):
    code = fields.String()
    message = fields.String()


class JobInput(Schema):
    contentType = fields.String()
    prompt = fields.String()
    settings = fields.Dict(metadata={"description": "The settings as submitted"})
    provider = fields.String(metadata={
        "description": "The provider the caller named; absent when it was chosen by routing"})


class Job(Schema):
    jobId = fields.String()
    status = fields.String(metadata={
        "description": "pending, queued, processing, completed, failed or cancelled"})
    contentType = fields.String()
    provider = fields.String()
    estimatedCost = fields.String(allow_none=True)
    actualCost = fields.String(allow_none=True)
    attempts = fields.Integer()
    progress = fields.Float(allow_none=True, metadata={
        "description": "0 to 1 where the provider reports it (ComfyUI, Runway, OpenAI video)"})
    createdAt = fields.String()
    updatedAt = fields.String()
    queuedAt = fields.String(allow_none=True)
    reservedAt = fields.String(allow_none=True)
    startedAt = fields.String(allow_none=True)
    storedAt = fields.String(allow_none=True)
    settledAt = fields.String(allow_none=True)
    completedAt = fields.String(allow_none=True)
    result = fields.Nested(JobResult, allow_none=True)
    preview = fields.String(allow_none=True)
    error = fields.Nested(JobError, allow_none=True)
    queuePosition = fields.Integer(allow_none=True, metadata={
        "description": "For a pending or queued job, its place (1 = next) among the jobs "
                       "of every company waiting for the same provider queue; at most "
                       "10000 (meaning that far back or further); null otherwise"})
    cancelAfter = fields.String(allow_none=True, metadata={
        "description": "The job's deadline from the `Cancel-After` header: a job not done "
                       "by then is cancelled and refunded; null without one"})
    cancelledBy = fields.String(allow_none=True, metadata={
        "description": "Who cancelled the job: `API key <id>`, or `deadline` for its "
                       "`Cancel-After`; null unless cancelled"})
    cancelledAt = fields.String(allow_none=True, metadata={
        "description": "When the job was cancelled; null unless cancelled"})
    input = fields.Nested(JobInput, metadata={
        "description": "What was asked for: `POST /v1/jobs` with it submits the job again"})


class JobList(Schema):
    jobs = fields.List(fields.Nested(Job))
    nextCursor = fields.String(allow_none=True, metadata={
        "description": "Pass as `cursor` for the next page; null on the last page"})


JOB_STATUSES = ("pending", "queued", "processing", "completed", "failed", "cancelled")


class StatusList(fields.List):
    """Statuses repeated (`status=a&status=b`), comma-separated (`status=a,b`) or both."""

    def __init__(self, **kwargs):
        # Documented one status per value; a comma-separated value is accepted as well.
        super().__init__(fields.String(metadata={"enum": list(JOB_STATUSES)}), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        values = value if isinstance(value, list | tuple) else [value]
        statuses = []
        for item in super()._deserialize(values, attr, data, **kwargs):
            statuses.extend(s.strip() for s in item.split(",") if s.strip())
        unknown = sorted({s for s in statuses if s not in JOB_STATUSES})
        if unknown:
            raise ValidationError(f"Unknown status {unknown[0]!r}; one of: "
                                  + ", ".join(JOB_STATUSES) + ".")
        return tuple(dict.fromkeys(statuses))


def _utc_representable(value) -> None:
    """An offset can carry year 1 or 9999 out of Python's range once turned to UTC."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValidationError("Out of range once converted to UTC.") from None


class JobListQuery(Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100),
                           metadata={"description": "Jobs per page, 1 to 100"})
    cursor = fields.String(load_default=None, validate=validate.Length(max=200), metadata={
        "description": "The previous page's nextCursor; absent for the first page"})
    status = StatusList(load_default=(), metadata={
        "description": "One or several of " + ", ".join(JOB_STATUSES)
                       + " (repeated or comma-separated)"})
    contentType = fields.String(load_default=None, validate=validate.OneOf(CONTENT_TYPES))
    provider = fields.String(load_default=None, validate=validate.Regexp(
        r"^[A-Za-z0-9_.-]{1,64}$"), metadata={"description": "A provider name, e.g. local"})
    createdAfter = fields.AwareDateTime(load_default=None, validate=_utc_representable, metadata={
        "description": "ISO 8601 with a timezone (Z or %2B00:00): jobs created after it"})
    createdBefore = fields.AwareDateTime(load_default=None, validate=_utc_representable, metadata={
        "description": "ISO 8601 with a timezone: jobs created before it"})


class ErrorEnvelope(Schema):
    """Every error response: a message, a stable code, and details naming the field."""

    error = fields.String(required=True, metadata={
        "description": "A message for people; may change"})
    code = fields.String(required=True, metadata={
        "description": "A stable code for programs: each operation's error responses list "
                       "those it can return (VALIDATION_ERROR, UNAUTHORIZED, FORBIDDEN, "
                       "INSUFFICIENT_CREDITS, BUDGET_EXCEEDED, PROVIDER_NOT_CONFIGURED, "
                       "IDEMPOTENCY_IN_FLIGHT, IDEMPOTENCY_KEY_REUSED, PROVIDER_UNAVAILABLE, "
                       "JOB_NOT_FOUND, PAYLOAD_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE, "
                       "INTERNAL_ERROR, ...)"})
    details = fields.Dict(required=True, metadata={
        "description": "`field` names the field at fault (a path such as "
                       "`settings.steps[2].text`); `fields` has marshmallow's messages"})
