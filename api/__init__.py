"""The Flask app: parses a request, calls one use case, shapes the response."""

from __future__ import annotations

from decimal import Decimal

from flask import Flask
from flask_smorest import Api
from marshmallow import fields, validate

from api import access, docs, gate, limits
from api.errors import register_error_handlers
from api.schemas import ErrorEnvelope


class PipelineApi(Api):
    """flask-smorest's Api, its default error response written as our envelope."""

    ERROR_SCHEMA = ErrorEnvelope


def create_app(runtime) -> Flask:
    """The WSGI app over a Runtime (database, storage, providers, publisher)."""
    app = Flask("pipeline")
    app.config.update(
        API_TITLE="Content pipeline",
        API_VERSION="1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        # Swagger UI's files are served from the installed package, not a CDN.
        OPENAPI_SWAGGER_UI_URL=docs.ASSETS_URL,
        # Swagger UI would otherwise ask validator.swagger.io to check the document.
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": docs.SECURITY_SCHEMES},
            "security": [{"bearer": []}],
        },
    )
    app.extensions["runtime"] = runtime
    api = PipelineApi(app, spec_kwargs={"extra_plugins": [docs.ErrorResponses(app)]})
    api.ma_plugin.converter.add_attribute_function(numeric_range)
    api.ma_plugin.converter.add_attribute_function(docs.runtime_values(runtime))
    from api import (
        attempts,
        console,
        events,
        files,
        health,
        jobs,
        metrics,
        provider_keys,
        providers,
        seed,
        wallet,
        webhooks,
    )

    for blueprint in (jobs, attempts, webhooks, wallet, provider_keys, providers,
                      console, files, seed, health):
        api.register_blueprint(blueprint.blp)
    metrics.init_app(app, api)
    events.init_app(app, api)  # its blueprint, and the hub its streams wait on
    app.register_blueprint(docs.assets_blueprint())
    # Before the gate: its hook counts a request the gate may then refuse (api/limits.py).
    limits.install(app, runtime.settings)
    gate.install(app)
    access.install(app)
    register_error_handlers(app)
    return app


def numeric_range(_converter, field, ret: dict, **_kwargs) -> dict:
    """A Range on a number field as JSON Schema numbers, exclusive where the check is.

    apispec writes the bounds through the field, so a Decimal shown as a string gets
    the minimum "0.000000", which schema tools reject; and it drops exclusiveness."""
    if not isinstance(field, fields.Number) or ret.get("type") not in ("number", "integer"):
        return {}
    bounds = {}
    for check in field.validators:
        if not isinstance(check, validate.Range):
            continue
        if check.min is not None:
            bounds["minimum"] = _plain(check.min)
            if not check.min_inclusive:
                bounds["exclusiveMinimum"] = True
        if check.max is not None:
            bounds["maximum"] = _plain(check.max)
            if not check.max_inclusive:
                bounds["exclusiveMaximum"] = True
    return bounds


def _plain(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value
