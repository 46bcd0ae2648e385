"""Entry point for `celery -A tasks.worker`: the app built from the environment's settings."""

import sys

from celery import signals

from pipeline.config import ConfigError, Settings
from service import heap
from service.logs import configure_logging, flush
from tasks.app import create_celery

try:
    settings = Settings.from_env()
except ConfigError as exc:
    # SystemExit passes through celery's app loader; anything else becomes a traceback.
    sys.exit(f"error: {exc}")
app = create_celery(settings)

# `celery -A tasks.worker beat` loads this module too.
SERVICE = "beat" if "beat" in sys.argv[1:] and "worker" not in sys.argv[1:] else "worker"


_configured = False


@signals.setup_logging.connect
def _setup_logging(**_):
    # A receiver here means Celery installs no handler or format of its own, and leaves
    # stdout alone: every line is ours (LOG_FORMAT, LOG_LEVEL; -l is not consulted).
    global _configured  # noqa: PLW0603 (once per process, from whichever hook runs first)
    if not _configured:
        configure_logging(settings, service=SERVICE)
        _configured = True


@signals.celeryd_init.connect
def _worker_init(instance=None, **_):
    # Earlier than setup_logging: the worker's start-up warnings (running as root, say)
    # come before Celery sets up logging, and would be printed as plain text.
    _setup_logging()
    if settings.log_format == "json":
        instance.quiet = True  # the startup banner is not a log line


@signals.worker_ready.connect
def _freeze_when_ready(**_):
    # The node's own process: the consumer, and the tasks too with the threads and gevent
    # pools. Past this point its start-up objects are never walked by a collection again.
    heap.freeze_startup_objects()


@signals.worker_process_init.connect
def _freeze_in_pool_process(**_):
    heap.freeze_startup_objects()  # a prefork pool process, as it starts


@signals.worker_process_shutdown.connect
def _write_last_log_rows(**_):
    flush(timeout=2.0)  # a pool process ends with os._exit, past logging's own atexit
