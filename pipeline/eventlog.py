"""The `logs` table (seed 000), written off the job's path by a buffering log handler.

A record becomes a row in the thread that logs it (a dict, no I/O) and waits in a bounded
queue; one background thread per process writes the queue in batches, on a connection
of its own. So a slow or failing database for logs can never fail or slow a job: when
the queue is full, records are dropped and counted (the next batch says how many), and
a failed batch is dropped with one line on stderr. The price is that a process killed
with SIGKILL loses its last second of rows; stdout has every line regardless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
import weakref
from datetime import UTC, datetime

from pipeline.logcontext import FIELDS, SECRETS

# The seed's level words.
LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
          logging.ERROR: "error", logging.CRITICAL: "critical"}
MESSAGE_CHARS = 4000
ERROR_CHARS = 8000
# Record attributes every record has; what is left over came with `extra=` and goes
# into the row's metadata.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "service",
                                                    "_stamped", "taskName", *FIELDS}


_INHERITED: list = []


class OwnRecords(logging.Filter):
    """Our own loggers' records at the handler's level; anyone else's (Celery's per-task
    chatter, the HTTP server's) only from `foreign_level` up."""

    def __init__(self, prefix: str = "pipeline", foreign_level: int = logging.WARNING):
        super().__init__()
        self.prefix, self.foreign_level = prefix, foreign_level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == self.prefix or record.name.startswith(self.prefix + ".")
        return own or record.levelno >= self.foreign_level


def _level_word(levelno: int) -> str:
    for number in sorted(LEVELS, reverse=True):
        if levelno >= number:
            return LEVELS[number]
    return "debug"


def _text(value: str, limit: int) -> str:
    # PostgreSQL refuses NUL and unpaired surrogates; both would cost the whole batch.
    value = value.replace("\x00", "\ufffd")[:limit]
    return value.encode("utf-8", "replace").decode("utf-8")


def _uuid(value) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def _json_safe(value) -> dict:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return {"unserializable": repr(value)[:200]}


def row_for(record: logging.LogRecord, service: str) -> dict:
    """The `logs` row for a record stamped by logcontext.ContextFilter."""
    error = None
    if record.exc_info:
        error = SECRETS.scrub(logging.Formatter().formatException(record.exc_info))
    elif getattr(record, "error", None):
        error = str(record.error)
    metadata = {k: v for k, v in vars(record).items()
                if k not in _STANDARD and k != "error" and not k.startswith("_")}
    metadata.update(logger=record.name, task=getattr(record, "task", None),
                    request_id=getattr(record, "request_id", None))
    return {
        "id": uuid.uuid4(),
        "level": _level_word(record.levelno),
        "service": getattr(record, "service", service),
        "message": _text(record.getMessage(), MESSAGE_CHARS),
        "job_id": _uuid(getattr(record, "job_id", None)),
        "user_id": _uuid(getattr(record, "user_id", None)),
        "company_id": _uuid(getattr(record, "company_id", None)),
        "provider": getattr(record, "provider", None),
        "content_type": getattr(record, "content_type", None),
        "error": _text(error, ERROR_CHARS) if error else None,
        "metadata": _json_safe({k: v for k, v in metadata.items() if v is not None}),
        "timestamp": datetime.fromtimestamp(record.created, UTC),
    }


class DatabaseLogHandler(logging.Handler):
    """Buffers records and writes them to `logs` in batches from a background thread."""

    def __init__(self, database_url: str, *, service: str, level=logging.INFO,
                 capacity: int = 10_000, batch_size: int = 500, linger: float = 0.5):
        super().__init__(level)
        self.database_url = database_url
        self.service = service
        self.capacity, self.batch_size, self.linger = capacity, batch_size, linger
        self._reset()
        me = weakref.ref(self)
        # A fork while the writer is inside a write could leave the child holding a lock
        # the writer held (an import's, the driver's) forever: forks wait for the write.
        os.register_at_fork(before=lambda: (h := me()) and h._before_fork(),
                            after_in_parent=lambda: (h := me()) and h._after_fork(),
                            after_in_child=lambda: (h := me()) and h._reset())

    def _reset(self) -> None:
        if getattr(self, "_engine", None) is not None:
            # The parent's connections: never closed, never even collected here, or the
            # child would end the parent's sessions.
            _INHERITED.append(self._engine)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # rows queued or in a batch being written
        self._dropped = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._engine = None
        self._writing = threading.Lock()
        self._held_for_fork = False
        self._last_complaint = 0.0
        self._closed = getattr(self, "_closed", False)

    def _before_fork(self) -> None:
        # Bounded: a write stuck on a hung database must not stop a pool from forking.
        self._held_for_fork = self._writing.acquire(timeout=2)

    def _after_fork(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._writing.release()

    # --- the logging side: never blocks, never raises -----------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed or threading.current_thread() is self._thread:
            return  # the writer's own records (its driver, its errors) would loop
        try:
            row = row_for(record, self.service)
        except Exception:  # a record we cannot turn into a row is not worth a job
            self.handleError(record)
            return
        with self._idle:
            if self._pending >= self.capacity:
                self._dropped += 1
                return
            self._pending += 1
            if self._thread is None:
                try:
                    self._prepare()
                except Exception:  # no engine, no rows: this record goes to stdout only
                    self._pending -= 1
                    self.handleError(record)
                    return
                self._thread = threading.Thread(target=self._run, name="logs-table-writer",
                                                daemon=True)
                self._thread.start()
        self._queue.put(row)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every queued row is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        # logging.shutdown (at exit) closes handlers: give the last rows a moment.
        with contextlib.suppress(Exception):
            self.flush(timeout=1.0)
        self._closed = True
        super().close()

    def _prepare(self) -> None:
        """Imports and the engine, made here in the logging thread: the writer thread
        then only does I/O, and never holds an import lock a fork could inherit."""
        from pipeline.db import make_engine
        from pipeline.tables import logs  # noqa: F401

        if self._engine is None:
            self._engine = make_engine(self.database_url, pool_size=1)

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            until = time.monotonic() + self.linger
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get(timeout=max(until - time.monotonic(), 0)))
                except queue.Empty:
                    break
            try:
                with self._writing:
                    self._write(batch)
            except Exception as exc:
                self._complain(f"{len(batch)} log rows not written: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    self._idle.notify_all()

    def _write(self, batch: list[dict]) -> None:
        from pipeline.db import make_engine
        from pipeline.tables import logs

        with self._idle:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            batch = [*batch, {
                "id": uuid.uuid4(), "level": "warn", "service": self.service,
                "message": f"{dropped} log records were dropped: the logs table could not "
                           "keep up", "job_id": None, "user_id": None, "company_id": None,
                "provider": None, "content_type": None, "error": None,
                "metadata": {"logger": __name__}, "timestamp": datetime.now(UTC)}]
        if self._engine is None:
            self._engine = make_engine(self.database_url, pool_size=1)
        with self._engine.begin() as conn:
            conn.execute(logs.insert(), batch)

    def _complain(self, line: str) -> None:
        # Not through logging: that would queue more rows for the same failing table.
        now = time.monotonic()
        if now - self._last_complaint >= 60:
            self._last_complaint = now
            print(f"logs table: {line}", file=sys.stderr, flush=True)
