"""Logging for every process, set once at its start: a line per record, the logs table.

Lines go to stdout (one-shot CLI commands, whose stdout is their answer, use stderr), as
JSON (python-json-logger) or as text (LOG_FORMAT; `pipeline run` defaults to text), at
LOG_LEVEL. Each line carries the fields of pipeline.logcontext's scope: job, company,
user, provider, content type, task. Records at LOG_TABLE_LEVEL and up also become rows of
the `logs` table through pipeline.eventlog's buffered writer.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from pipeline.eventlog import DatabaseLogHandler, OwnRecords
from pipeline.logcontext import FIELDS, SECRETS, ContextFilter, never_log

# Loggers whose INFO lines repeat what ours say better (api.access for the HTTP server),
# or say nothing an operator needs (Alembic's plugin set-up, on every migration run).
QUIET = {"werkzeug": logging.WARNING, "alembic.runtime.plugins": logging.WARNING}


class JsonLines(JsonFormatter):
    """{"timestamp", "level", "logger", "message", "service", the scope's fields, extras}."""

    def __init__(self):
        super().__init__("%(levelname)s %(name)s %(message)s",
                         rename_fields={"levelname": "level", "name": "logger"},
                         reserved_attrs=[*RESERVED_ATTRS, "_stamped", "taskName"],
                         timestamp=True)

    def formatException(self, ei) -> str:
        return SECRETS.scrub(super().formatException(ei))

    def process_log_record(self, log_data: dict) -> dict:
        # The time first, as a reader scans for it.
        return {"timestamp": log_data.pop("timestamp", None), **log_data}


class TextLines(logging.Formatter):
    """`2026-01-02 10:00:00,123 INFO    pipeline.generation: message  [job_id=... task=...]`"""

    def __init__(self):
        super().__init__("%(asctime)s")

    def formatMessage(self, record) -> str:
        fields = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS
                          if getattr(record, name, None))
        line = f"{record.asctime} {record.levelname:<7} {record.name}: {record.message}"
        return f"{line}  [{fields}]" if fields else line

    def formatException(self, ei) -> str:
        return SECRETS.scrub(super().formatException(ei))


def _ours(handler: logging.Handler) -> logging.Handler:
    handler._pipeline = True
    return handler


def configure_logging(settings, *, service: str, stream=None, level: str | None = None,
                      table: bool = True) -> None:
    """Replace the handlers an earlier call installed (never anyone else's) on the root
    logger. `level` overrides LOG_LEVEL (a one-shot command's quieter default)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pipeline", False)]:
        root.removeHandler(handler)
        handler.close()
    for secret in (settings.secret_key, *settings.provider_key_secrets,
                   *(v for k, v in settings.provider_env.items() if k.endswith("_API_KEY"))):
        never_log(secret)
    stamp = ContextFilter(service)
    lines = _ours(logging.StreamHandler(stream or sys.stdout))
    lines.setFormatter(JsonLines() if settings.log_format == "json" else TextLines())
    lines.addFilter(stamp)
    root.addHandler(lines)
    root.setLevel((level or settings.log_level).upper())
    logging.captureWarnings(True)  # warnings.warn becomes a line like any other
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    if table and settings.log_table_level != "off":
        rows = _ours(DatabaseLogHandler(settings.database_url, service=service,
                                        level=settings.log_table_level.upper()))
        rows.addFilter(stamp)
        rows.addFilter(OwnRecords())
        root.addHandler(rows)


def flush(timeout: float = 5.0) -> bool:
    """Write what the logs table's handler still holds (a process about to exit)."""
    done = True
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DatabaseLogHandler):
            done = handler.flush(timeout) and done
    return done
