"""The Flask app: parses a request, calls one use case, shapes the response."""

from __future__ import annotations

from decimal import Decimal

from flask import Flask
from flask_smorest import Api
from marshmallow import fields, validate

from api import access, gate
from api.errors import register_error_handlers


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
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API key made by `pipeline company create`"}}},
            "security": [{"bearer": []}],
        },
    )
    app.extensions["runtime"] = runtime
    api = Api(app)
    api.ma_plugin.converter.add_attribute_function(numeric_range)
    from api import files, health, jobs, metrics, provider_keys, seed, wallet

    api.register_blueprint(jobs.blp)
    api.register_blueprint(wallet.blp)
    api.register_blueprint(provider_keys.blp)
    app.register_blueprint(files.blp)
    app.register_blueprint(seed.blp)
    app.register_blueprint(health.blp)
    metrics.init_app(app)
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
