"""How a job's wake-ups travel between processes: the transport a deployment uses, and its
announcers (the sending half of pipeline.jobevents; service/jobhub.py listens).

The transport follows what the deployment already runs, so nothing new is deployed for it:
- Redis pub/sub when the broker is Redis (or EVENTS_URL names a Redis), on a channel under
  the broker's key prefix: pub/sub channels ignore Redis' database numbers, and two
  deployments (or two test runs) sharing one Redis must not wake each other.
- PostgreSQL LISTEN/NOTIFY when the database is PostgreSQL and there is no Redis: a
  channel is per database, so it needs no prefix.
- Otherwise (the embedded SQLite mode) nothing is sent: the API's hub polls the database.

A message is only `<job id> <event>`; listeners read the job itself from the database.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from pipeline.config import ConfigError, Settings
from pipeline.jobevents import Announcer

log = logging.getLogger("pipeline.jobevents")

REDIS, POSTGRES, POLL = "redis", "postgres", "poll"
REDIS_CHANNEL = "pipeline:job-events"
POSTGRES_CHANNEL = "pipeline_job_events"
# After a failed send, this process stops sending for this long: a broker that is down
# (or stopped without closing its sockets) would otherwise cost every job step a timeout.
# Listeners re-read their jobs on each keep-alive, so a skipped wake-up only delays.
QUIET_AFTER_FAILURE_SECONDS = 30.0
# What a process's exit waits, at most, for its queued wake-ups to go out.
FLUSH_AT_EXIT_SECONDS = 1.0
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class Transport:
    kind: str  # REDIS, POSTGRES or POLL
    url: str = ""  # the Redis URL; the database's for POSTGRES
    channel: str = ""


def transport_of(settings: Settings) -> Transport:
    """The transport EVENTS_URL names, or the one the broker and database imply."""
    chosen = settings.events_url
    database_is_postgres = make_url(settings.database_url).get_backend_name() == "postgresql"
    if chosen.startswith(_REDIS_SCHEMES) or (
            not chosen and settings.broker_url.startswith(_REDIS_SCHEMES)):
        return Transport(REDIS, chosen or settings.broker_url,
                         settings.broker_key_prefix + REDIS_CHANNEL)
    if chosen in ("postgresql", "postgres") or (not chosen and database_is_postgres):
        if not database_is_postgres:
            raise ConfigError("EVENTS_URL=postgresql needs a PostgreSQL DATABASE_URL; use "
                              "EVENTS_URL=poll (or leave it empty) with SQLite.")
        return Transport(POSTGRES, settings.database_url, POSTGRES_CHANNEL)
    if chosen in ("", "poll"):
        return Transport(POLL)
    raise ConfigError(f"EVENTS_URL must be a redis:// URL, 'postgresql' or 'poll' (or empty, "
                      f"to follow the broker and the database), not {chosen[:20]!r}...")


def encode(job_id, event: str) -> str:
    return f"{job_id} {event}"


def decode(message: bytes | str) -> str | None:
    """The job id a wake-up names (lower case, as the hub keys it); None when malformed."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    job_id = text.partition(" ")[0].strip().lower()
    return job_id or None


class _Quiet:
    """Stops a process's sending for a while after a failure, and logs that once."""

    def __init__(self, what: str):
        self.what = what
        self.until = 0.0

    def closed(self) -> bool:
        return time.monotonic() < self.until

    def failed(self, exc: Exception) -> None:
        self.until = time.monotonic() + QUIET_AFTER_FAILURE_SECONDS
        log.warning("job wake-ups over %s failed (%s: %s); none sent for %.0f s, live "
                    "listeners fall back to their keep-alive reads", self.what,
                    type(exc).__name__, exc, QUIET_AFTER_FAILURE_SECONDS)


class RedisAnnouncer(Announcer):
    """PUBLISH on the deployment's channel, from one sender thread per process.

    `job_changed` only puts the message on the sender's queue: a job step never waits for
    Redis, and a hundred SaaS threads do not each take a pooled connection for a wake-up
    (measured on a SaaS node at concurrency 100: 8% of its interpreter time went to that,
    ahead of each provider call). The sender takes whatever has queued since its last
    send and publishes it as one pipelined round trip, in order. The thread and its
    client are made on first use in each process (a forked worker never shares its
    parent's sockets), and at exit the sender is given `FLUSH_AT_EXIT_SECONDS` to send
    what is still queued."""

    BATCH = 500

    def __init__(self, url: str, channel: str, timeout: float):
        self.url = url
        self.channel = channel
        self.timeout = timeout
        self._queue: queue.SimpleQueue | None = None
        self._pid = None
        self._lock = threading.Lock()
        self._quiet = _Quiet("Redis")

    def job_changed(self, job_id, event: str) -> None:
        if self._quiet.closed():
            return
        self._queue_here().put(encode(job_id, event))

    def flush(self, timeout: float) -> bool:
        """Wait until what was queued before this call has been sent (or dropped after a
        failure); False when `timeout` passed first."""
        if self._pid != os.getpid():
            return True  # nothing was queued in this process
        done = threading.Event()
        self._queue_here().put(done)
        return done.wait(timeout)

    def _queue_here(self) -> queue.SimpleQueue:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    # A forked child gets a queue and a sender of its own; the parent's
                    # thread did not survive the fork, and its client's sockets are not ours.
                    self._queue = queue.SimpleQueue()
                    threading.Thread(target=self._send_forever, args=(self._queue,),
                                     name="job-wakeups", daemon=True).start()
                    atexit.register(self.flush, FLUSH_AT_EXIT_SECONDS)
                    self._pid = os.getpid()
        return self._queue

    def _send_forever(self, waiting: queue.SimpleQueue) -> None:
        client = None
        while True:
            batch = [waiting.get()]
            while len(batch) < self.BATCH:
                try:
                    batch.append(waiting.get_nowait())
                except queue.Empty:
                    break
            messages = [m for m in batch if isinstance(m, str)]
            if messages and not self._quiet.closed():
                try:
                    if client is None:  # made here, so a bad URL is one logged failure
                        import redis

                        client = redis.Redis.from_url(
                            self.url, socket_connect_timeout=self.timeout,
                            socket_timeout=self.timeout)
                    pipe = client.pipeline(transaction=False)
                    for message in messages:
                        pipe.publish(self.channel, message)
                    pipe.execute()
                except Exception as exc:  # redis.RedisError, OSError: only lost wake-ups
                    self._quiet.failed(exc)
            for flushed in batch:
                if isinstance(flushed, threading.Event):
                    flushed.set()


class PostgresAnnouncer(Announcer):
    """NOTIFY through the process's own engine: one short statement per event."""

    def __init__(self, engine, channel: str):
        self.engine = engine
        self.channel = channel
        self._quiet = _Quiet("PostgreSQL NOTIFY")

    def job_changed(self, job_id, event: str) -> None:
        if self._quiet.closed():
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(select(func.pg_notify(self.channel, encode(job_id, event))))
        except Exception as exc:  # the database refused: only ever a lost wake-up
            self._quiet.failed(exc)


def announcer_for(settings: Settings, engine) -> Announcer:
    """The process's announcer; the polled transport needs none (the base one sends nothing)."""
    transport = transport_of(settings)
    if transport.kind == REDIS:
        return RedisAnnouncer(transport.url, transport.channel,
                              min(settings.publish_timeout_seconds, 2.0))
    if transport.kind == POSTGRES:
        return PostgresAnnouncer(engine, transport.channel)
    return Announcer()
