"""The OpenAPI document's shared parts: error responses, security, runtime enums, /docs assets.

Views declare the domain codes they can return with `@errors(...)`; `ErrorResponses`
adds what the gate (api/gate.py) and the error handlers (api/errors.py) can answer
anywhere, and writes every 4xx and 5xx as the `ErrorEnvelope` with its codes listed.
Swagger UI's files come from the `swagger-ui-bundle` package, served by this process:
the docs page loads nothing from another origin.
"""

from __future__ import annotations

from apispec import BasePlugin
from flask import Blueprint, send_from_directory
from flask_smorest import Blueprint as ApiBlueprint
from marshmallow import fields

from api import gate

ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}
X_ERRORS = "x-error-codes"  # carried from `errors()` to the plugin, removed there

# Every code a response envelope can carry, with its status and when (README's table).
CODES: dict[str, tuple[int, str]] = {
    "VALIDATION_ERROR": (400, "the body, a query parameter or a setting is invalid; "
                              "`details.field` names it"),
    "PROVIDER_NOT_CONFIGURED": (400, "the named provider has no key or is left out of "
                                     "this deployment"),
    "UNAUTHORIZED": (401, "missing, malformed or unknown key"),
    "INSUFFICIENT_CREDITS": (402, "the wallet cannot cover the estimate"),
    "BUDGET_EXCEEDED": (402, "a company, user or key budget would be passed"),
    "FORBIDDEN": (403, "not allowed to this key (a client key on an admin endpoint, "
                       "another company's `companyId` or `userId`)"),
    "LINK_EXPIRED": (403, "the file link was tampered with or has expired"),
    "JOB_NOT_FOUND": (404, "no such job for this company, or a malformed id"),
    "FILE_NOT_FOUND": (404, "no such file, or files are served by the object store"),
    "PROVIDER_KEY_NOT_FOUND": (404, "the company has no key for this provider"),
    "NOTHING_TO_REFUND": (404, "the job has no charge left to refund"),
    "JOB_ALREADY_FINISHED": (409, "the job has already ended or generated its result"),
    "IDEMPOTENCY_IN_FLIGHT": (409, "a request with this `Idempotency-Key` is still running "
                                   "(`Retry-After` says when to retry)"),
    "PAYLOAD_TOO_LARGE": (413, "a body of 1 MiB or more"),
    "UNSUPPORTED_MEDIA_TYPE": (415, "a body that is not `application/json`"),
    "IDEMPOTENCY_KEY_REUSED": (422, "this `Idempotency-Key` came with another body"),
    "RATE_LIMITED": (429, "this key or its company has used its requests for now "
                          "(`details.scope`: `key` or `company`; `Retry-After` says when "
                          "to retry)"),
    "INTERNAL_ERROR": (500, "a bug: the log has the traceback, the response never does"),
    "PROVIDER_UNAVAILABLE": (503, "every provider for this content type is cooling down"),
    "DATABASE_UNAVAILABLE": (503, "the database did not answer (a restart, or every "
                                  "connection busy): nothing was changed; retry after "
                                  "`Retry-After` seconds"),
}
_BODY_CODES = ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE", "UNSUPPORTED_MEDIA_TYPE")
# The gate refuses a NUL in any query parameter, so every operation can say 400.
_ANYWHERE = ("VALIDATION_ERROR", "INTERNAL_ERROR", "DATABASE_UNAVAILABLE")
# What a 429 (RATE_LIMITED, api/limits.py) carries besides its envelope.
RATE_LIMIT_HEADERS = {
    name: {"description": description, "required": True, "schema": {"type": "integer"}}
    for name, description in (
        ("Retry-After", "Seconds to wait before retrying"),
        ("RateLimit-Limit", "Requests allowed in the budget's window"),
        ("RateLimit-Remaining", "Requests left in it (0 here)"),
        ("RateLimit-Reset", "Seconds until the budget has room again"),
    )
}
_BODY_METHODS = ("post", "put", "patch")

METRICS_SECURITY = "metricsToken"
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "An API key made by `pipeline company create`"},
    METRICS_SECURITY: {"type": "http", "scheme": "bearer",
                       "description": "The operators' METRICS_TOKEN, for /metrics only "
                                      "(without one set, only loopback callers are answered)"},
}

ASSETS_BLUEPRINT = "docs-assets"
ASSETS_URL = "/docs/assets/"


def errors(*codes: str):
    """Documents the domain codes a view can return, beyond those every view can."""
    unknown = set(codes) - set(CODES)
    if unknown:
        raise ValueError(f"undocumented error codes: {sorted(unknown)}")
    return ApiBlueprint.doc(**{X_ERRORS: list(codes)})


def envelope_response(codes) -> dict:
    return {"description": describe(codes),
            "content": {"application/json": {"schema": ENVELOPE}}}


def describe(codes) -> str:
    return "; ".join(f"`{code}`: {CODES[code][1]}" for code in codes)


class ErrorResponses(BasePlugin):
    """Writes each operation's error responses, and its security, from what it can meet."""

    def __init__(self, app):
        self.app = app

    def operation_helper(self, path=None, operations=None, **kwargs):
        rule = kwargs.get("rule")
        endpoint = getattr(rule, "endpoint", "") or ""
        blueprint = endpoint.rpartition(".")[0]
        for method, operation in (operations or {}).items():
            codes = list(_ANYWHERE) + operation.pop(X_ERRORS, [])
            if method in _BODY_METHODS:
                codes += _BODY_CODES
            if blueprint == "metrics":
                operation["security"] = [{METRICS_SECURITY: []}]
                codes += ["UNAUTHORIZED", "FORBIDDEN"]
            elif blueprint in gate.PUBLIC_BLUEPRINTS:
                operation["security"] = []
            else:
                codes.append("UNAUTHORIZED")
                if self._admin_only(endpoint, method):
                    codes.append("FORBIDDEN")
                if self._rate_limited():
                    codes.append("RATE_LIMITED")
            self._document(operation, codes)

    def _rate_limited(self) -> bool:
        runtime = self.app.extensions.get("runtime")
        return bool(getattr(getattr(runtime, "settings", None), "rate_limits_enabled", True))

    def _admin_only(self, endpoint: str, method: str) -> bool:
        view = self.app.view_functions.get(endpoint)
        view_class = getattr(view, "view_class", None)
        if view_class is not None:
            view = getattr(view_class, method, None)
        return bool(getattr(view, "admin_only", False))

    @staticmethod
    def _document(operation: dict, codes: list[str]) -> None:
        responses = operation.setdefault("responses", {})
        # flask-smorest's "default" names its own error schema: ours replaces it.
        responses["default"] = envelope_response(["INTERNAL_ERROR"])
        responses["default"]["description"] = "Any other error, in the same envelope"
        by_status: dict[str, list[str]] = {}
        for code in dict.fromkeys(codes):
            by_status.setdefault(str(CODES[code][0]), []).append(code)
        for key in list(responses):
            if str(key) != key:
                responses[str(key)] = responses.pop(key)
        if not isinstance(responses.get("422"), dict) or "$ref" in responses["422"]:
            # flask-smorest's own 422 for a schema's refusal: api/errors.py answers 400.
            responses.pop("422", None)
        for status, status_codes in sorted(by_status.items()):
            given = responses.get(status)
            if not isinstance(given, dict):
                responses[status] = envelope_response(status_codes)
                if status == "429":
                    responses[status]["headers"] = RATE_LIMIT_HEADERS
                continue
            given.setdefault("content", {"application/json": {"schema": ENVELOPE}})
            missing = [c for c in status_codes if c not in given.get("description", "")]
            if missing:
                given["description"] = "; ".join(
                    filter(None, [given.get("description"), describe(missing)]))


def runtime_values(runtime):
    """An apispec attribute function: enums and lengths only the runtime knows.

    A field says what it documents with `metadata={"documents": "provider" | "prompt"}`:
    the providers of this deployment's registry, or the prompt's length bounds."""

    def attribute(_converter, field, ret: dict, **_kwargs) -> dict:
        kind = field.metadata.get("documents")
        if kind == "provider" and isinstance(field, fields.String):
            names = list(runtime.registry.names())
            return {"enum": [*names, None] if field.allow_none else names}
        if kind == "prompt" and isinstance(field, fields.String):
            return {"minLength": 1, "maxLength": runtime.settings.max_prompt_length}
        return {}

    return attribute


def assets_blueprint() -> Blueprint:
    """Swagger UI's own files (JavaScript, CSS), from the installed package."""
    from swagger_ui_bundle import swagger_ui_path

    blp = Blueprint(ASSETS_BLUEPRINT, __name__, url_prefix=ASSETS_URL.rstrip("/"))

    @blp.get("/<path:filename>")
    def asset(filename: str):
        return send_from_directory(swagger_ui_path, filename, max_age=86400)

    return blp
