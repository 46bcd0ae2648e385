"""Request and response shapes (marshmallow), which also write the OpenAPI document."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from pipeline.jobs import CONTENT_TYPES


class JobCreate(Schema):
    class Meta:
        unknown = RAISE

    contentType = fields.String(required=True, validate=validate.OneOf(CONTENT_TYPES),
                                metadata={"description": "text, image, audio or video"})
    prompt = fields.String(required=True, metadata={
        "description": "What to generate; 1 to MAX_PROMPT_LENGTH (default 4000) characters"})
    settings = fields.Dict(keys=fields.String(), load_default=dict, metadata={
        "description": "Provider settings, e.g. width/height (image), duration (video)"})
    providerName = fields.String(load_default=None, allow_none=True,
                                 metadata={"description": "Optional provider; chosen if absent"})
    provider = fields.String(load_default=None, allow_none=True,
                             metadata={"description": "Alias of providerName"})


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


class JobList(Schema):
    jobs = fields.List(fields.Nested(Job))


class JobListQuery(Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
    status = fields.String(load_default=None, validate=validate.OneOf(
        ("pending", "queued", "processing", "completed", "failed", "cancelled")))


class ErrorEnvelope(Schema):
    error = fields.String()
    code = fields.String()
    details = fields.Dict()
