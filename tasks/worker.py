"""Entry point for `celery -A tasks.worker`: the app built from the environment's settings."""

from pipeline.config import Settings
from tasks.app import create_celery

app = create_celery(Settings.from_env())
