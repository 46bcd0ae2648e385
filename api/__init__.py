"""The Flask app: parses a request, calls one use case, shapes the response."""

from __future__ import annotations

from flask import Flask
from flask_smorest import Api

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
        MAX_CONTENT_LENGTH=1024 * 1024,
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API key made by `pipeline company create`"}}},
            "security": [{"bearer": []}],
        },
    )
    app.extensions["runtime"] = runtime
    api = Api(app)
    from api import files, health, jobs, metrics, provider_keys, seed, wallet

    api.register_blueprint(jobs.blp)
    api.register_blueprint(wallet.blp)
    api.register_blueprint(provider_keys.blp)
    app.register_blueprint(files.blp)
    app.register_blueprint(seed.blp)
    app.register_blueprint(health.blp)
    app.register_blueprint(metrics.blp)
    register_error_handlers(app)
    return app
