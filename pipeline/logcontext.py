"""What every log record knows about the work it belongs to: job, company, provider, task.

A task (or a request) opens a `scope` with the ids it has; the use case that loads the job
row adds the rest with `bind_job`, so no step reads the job a second time for its logs.
`ContextFilter` copies the scope's fields onto every record that reaches our handlers,
and scrubs registered secrets from its text. contextvars keep each thread's (and each
greenlet's) scope its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType

# The fields a record may carry, in the order a text line shows them.
FIELDS = ("job_id", "company_id", "user_id", "provider", "content_type", "task", "request_id")

_scope: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "log_scope", default=MappingProxyType({}))


def current() -> Mapping[str, str]:
    return _scope.get()


@contextlib.contextmanager
def scope(**fields):
    """Bind `fields` for the block; whatever the block binds later is dropped with it."""
    token = _scope.set({**_scope.get(), **_clean(fields)})
    try:
        yield
    finally:
        _scope.reset(token)


def bind(**fields) -> None:
    """Add fields to the open scope (a request learns its company after authentication)."""
    _scope.set({**_scope.get(), **_clean(fields)})


def bind_job(job) -> None:
    """Add a job row's company, user, provider and content type to the scope of that job.

    Only a scope opened for this very job takes them: a sweep that walks many jobs, or a
    test that calls a use case directly, keeps its scope as it was.
    """
    fields = _scope.get()
    if fields.get("job_id") != str(job.id):
        return
    _scope.set({**fields, **_clean({"company_id": job.company_id, "user_id": job.user_id,
                                    "provider": job.provider,
                                    "content_type": job.content_type})})


def _clean(fields: dict) -> dict[str, str]:
    return {k: str(v) for k, v in fields.items() if v is not None}


class Secrets:
    """Strings that must never reach a log line, replaced wherever they appear.

    Nothing we log carries a key on purpose; this is the net under a vendor's error text
    that echoes one back. Bounded: the newest `limit` are kept.
    """

    MIN_LENGTH = 8  # shorter strings would scrub ordinary words
    MASK = "[redacted]"

    def __init__(self, limit: int = 1000):
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # a threads-pool worker adds while others scrub
        self.limit = limit

    def add(self, value: str | None) -> None:
        if not value or len(value) < self.MIN_LENGTH:
            return
        with self._lock:
            self._values[value] = None
            self._values.move_to_end(value)
            while len(self._values) > self.limit:
                self._values.popitem(last=False)

    def scrub(self, text: str) -> str:
        with self._lock:
            values = tuple(self._values)
        for value in values:
            if value in text:
                text = text.replace(value, self.MASK)
        return text


SECRETS = Secrets()


def never_log(value: str | None) -> None:
    """Register a secret (a provider key just decrypted, say) for scrubbing."""
    SECRETS.add(value)


class ContextFilter(logging.Filter):
    """Stamps the scope's fields and the process's service name on each record, and
    scrubs secrets from its message and exception text. Attach it to handlers."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_stamped", False):
            return True
        for name, value in _scope.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        record.service = self.service
        message = record.getMessage()
        scrubbed = SECRETS.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        record._stamped = True
        return True
