"""WSGI entry point for gunicorn: `gunicorn 'api.wsgi:create()'` builds the app from the env."""

from __future__ import annotations

import sys


def create():
    """Built per process (gunicorn calls this after fork), never at import."""
    from api import create_app
    from pipeline.config import ConfigError, Settings
    from service.logs import configure_logging
    from service.runtime import build_runtime
    from tasks.app import create_celery
    from tasks.chain import CeleryPublisher

    try:
        settings = Settings.from_env()
        configure_logging(settings, service="api")
        runtime = build_runtime(settings, publisher=CeleryPublisher(create_celery(settings)))
    except ConfigError as exc:  # a setting only the runtime checks (EVENTS_URL) included
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(4)  # gunicorn's APP_LOAD_ERROR: the master stops rather than respawning
    return create_app(runtime)
