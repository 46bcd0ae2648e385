"""Every error leaves the API in one envelope: {"error", "code", "details"}."""

from __future__ import annotations

import logging

from flask import jsonify
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.api")

_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
}


def envelope(message: str, code: str, status: int, details: dict | None = None):
    response = jsonify({"error": message, "code": code, "details": details or {}})
    response.status_code = status
    return response


def _validation_details(exc: HTTPException) -> dict:
    """webargs puts marshmallow's messages under data['messages'][location]."""
    data = getattr(exc, "data", None) or {}
    messages = data.get("messages") or {}
    if isinstance(messages, dict) and len(messages) == 1:
        (messages,) = messages.values()
    if not messages:
        return {}
    return {"field": _first_field(messages), "fields": messages}


def _first_field(messages) -> str | None:
    """The path of the first field marshmallow complained about: `settings.width`."""
    path = []
    while isinstance(messages, dict) and messages:
        name = sorted(messages, key=str)[0]
        path.append(str(name))
        messages = messages[name]
    return ".".join(path) or None


def register_error_handlers(app) -> None:
    @app.errorhandler(PipelineError)
    def _pipeline_error(exc: PipelineError):
        response = envelope(exc.message, exc.code, exc.status, exc.details)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
        details = _validation_details(exc)
        if status in (400, 422):
            status = 400
            message = "The request body is invalid." if details else (
                exc.description or "Bad request.")
            if "json" in str(exc.description or "").lower() and not details:
                message = "The request body is not valid JSON."
            return envelope(message, "VALIDATION_ERROR", 400, details)
        return envelope(exc.description or exc.name, code, status, details)

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def _database_unavailable(exc: Exception):
        # The database went away (a restart drops pooled connections) or every pooled
        # connection is busy: nothing was changed, and a retry in a moment may succeed.
        log.warning("database unavailable: %s", type(exc).__name__)
        response = envelope("The database is unavailable; retry shortly.",
                            "DATABASE_UNAVAILABLE", 503)
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # Never echo the exception: it may carry internals. The log has the traceback.
        log.exception("unhandled error")
        return envelope("Internal server error.", "INTERNAL_ERROR", 500)
