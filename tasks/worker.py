"""Entry point for `celery -A tasks.worker`: the app built from the environment's settings."""

import sys

from pipeline.config import ConfigError, Settings
from tasks.app import create_celery

try:
    settings = Settings.from_env()
except ConfigError as exc:
    # SystemExit passes through celery's app loader; anything else becomes a traceback.
    sys.exit(f"error: {exc}")
app = create_celery(settings)
