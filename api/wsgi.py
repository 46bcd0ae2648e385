"""WSGI entry point for gunicorn: `gunicorn 'api.wsgi:create()'` builds the app from the env."""

from __future__ import annotations


def create():
    """Built per process (gunicorn calls this after fork), never at import."""
    from api import create_app
    from pipeline.config import Settings
    from service.runtime import build_runtime
    from tasks.app import create_celery
    from tasks.chain import CeleryPublisher

    settings = Settings.from_env()
    return create_app(build_runtime(settings, publisher=CeleryPublisher(create_celery(settings))))
