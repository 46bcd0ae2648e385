"""The API process's hub of job wake-ups: one listener per process, fanned out to every
request that follows a job (an SSE stream, a `Prefer: wait` submission).

A request `watch`es a job, reads it, and waits on its watch; the hub's one thread hears
the deployment's wake-ups (service/announce.py: Redis pub/sub, PostgreSQL LISTEN, or on
the embedded SQLite mode one query per tick for every watched job together) and sets the
watches of the job named. So a thousand waiting requests cost one subscriber connection,
or one query per tick, never a query per request per tick.

The thread starts with the first watch and ends once nothing has been watched for
IDLE_SECONDS, so a process that never streams holds no connection for it. Whenever the
listener (re)connects it wakes every watch: messages sent while it was away are lost,
and a needless read is the price of never missing one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

from sqlalchemy import select
from sqlalchemy.engine import make_url

from pipeline.tables import jobs
from service import announce

log = logging.getLogger("pipeline.jobhub")

IDLE_SECONDS = 30.0
# How long a new watch waits for the listener to be subscribed before reading its job:
# a change between the read and the subscription would otherwise wait for a keep-alive.
READY_SECONDS = 2.0
RETRY_SECONDS = (0.5, 1, 2, 5)
LISTEN_TICK_SECONDS = 1.0  # how often a quiet listener checks whether it is still needed
POLL_CHUNK = 500  # ids per IN (...) list on the polled transport


class Watch:
    """One request's interest in one job: `wait` returns True when it was woken."""

    def __init__(self, hub: Hub, job_id: str):
        self.hub = hub
        self.job_id = job_id
        self._woken = threading.Event()

    def wake(self) -> None:
        self._woken.set()

    def wait(self, timeout: float) -> bool:
        """Until a wake-up or `timeout` seconds. Read the job after it returns: a wake-up
        that comes while reading sets the next wait off at once."""
        woken = self._woken.wait(max(0.0, timeout))
        self._woken.clear()
        return woken

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_exc) -> None:
        self.hub.unwatch(self)


class Hub:
    def __init__(self, listener):
        self.listener = listener
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._idle_since = time.monotonic()
        self._closed = False

    def close(self) -> None:
        """Stop listening within a tick (tests, a process shutting down); waits go on until
        their keep-alive or deadline reads."""
        with self._lock:
            self._closed = True
        self.wake_all()

    def watch(self, job_id) -> Watch:
        """Follow `job_id` from now on; use as a context manager to stop following."""
        watch = Watch(self, str(job_id).lower())
        with self._lock:
            self._watches.setdefault(watch.job_id, set()).add(watch)
            if self._thread is None and not self._closed:
                self._ready.clear()
                self._thread = threading.Thread(target=self._run, name="job-events hub",
                                                daemon=True)
                self._thread.start()
        if not self._closed:
            self._ready.wait(READY_SECONDS)
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            watchers = self._watches.get(watch.job_id)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watches[watch.job_id]
            if not self._watches:
                self._idle_since = time.monotonic()

    def watched(self) -> list[str]:
        with self._lock:
            return list(self._watches)

    def wake(self, job_id: str) -> None:
        with self._lock:
            watchers = list(self._watches.get(job_id, ()))
        for watch in watchers:
            watch.wake()

    def wake_all(self) -> None:
        for job_id in self.watched():
            self.wake(job_id)

    def ready(self) -> None:
        """Called by the listener once it hears every wake-up sent from now on."""
        self._ready.set()
        self.wake_all()

    def needed(self) -> bool:
        """False once nothing was watched for IDLE_SECONDS; the thread then ends, under
        the lock, so a watch arriving at that moment starts a new one."""
        with self._lock:
            if not self._closed and (
                    self._watches or time.monotonic() - self._idle_since < IDLE_SECONDS):
                return True
            self._thread = None
            self._ready.clear()
            return False

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self.listener.listen(self)
                return  # it returns once `needed()` said no: this thread is done
            except Exception as exc:
                self._ready.set()  # nobody waits for a listener that is down: reads go on
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                log.warning("job-events listener failed (%s: %s); again in %s s",
                            type(exc).__name__, exc, delay)
                time.sleep(delay)
                self.wake_all()
            if not self.needed():
                return


class RedisListener:
    def __init__(self, url: str, channel: str):
        self.url = url
        self.channel = channel

    def listen(self, hub: Hub) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=30,
                                      health_check_interval=15)
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            while hub.needed():
                message = pubsub.get_message(timeout=LISTEN_TICK_SECONDS)
                if message is None:
                    continue
                if message["type"] == "subscribe":  # also after redis-py reconnects
                    hub.ready()
                elif message["type"] == "message":
                    job_id = announce.decode(message["data"])
                    if job_id:
                        hub.wake(job_id)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()
            client.close()


class PostgresListener:
    def __init__(self, database_url: str, channel: str):
        # psycopg's own URL form: without SQLAlchemy's "+driver".
        self.conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.channel = channel

    def listen(self, hub: Hub) -> None:
        import psycopg

        # Keepalives: a server that vanished without closing the socket is noticed.
        with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5,
                             keepalives=1, keepalives_idle=30, keepalives_interval=10,
                             keepalives_count=3) as conn:
            conn.execute(f'LISTEN "{self.channel}"')
            hub.ready()
            while hub.needed():
                for note in conn.notifies(timeout=LISTEN_TICK_SECONDS):
                    job_id = announce.decode(note.payload)
                    if job_id:
                        hub.wake(job_id)


class PollListener:
    """The embedded mode's listener: every `interval`, one query over every watched job,
    waking those whose status or progress changed (or that it sees for the first time)."""

    def __init__(self, engine, interval: float):
        self.engine = engine
        self.interval = interval

    def listen(self, hub: Hub) -> None:
        seen: dict[str, tuple] = {}
        hub.ready()
        while hub.needed():
            watched = hub.watched()
            current = self._states(watched) if watched else {}
            for job_id, state in current.items():
                if seen.get(job_id) != state:
                    hub.wake(job_id)
            seen = current
            time.sleep(self.interval)

    def _states(self, job_ids: list[str]) -> dict[str, tuple]:
        ids = []
        for job_id in job_ids:
            with contextlib.suppress(ValueError):
                ids.append(uuid.UUID(job_id))
        states = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), POLL_CHUNK):
                rows = conn.execute(select(jobs.c.id, jobs.c.status, jobs.c.progress)
                                    .where(jobs.c.id.in_(ids[start:start + POLL_CHUNK])))
                states.update({str(r.id): (r.status, r.progress) for r in rows})
        return states


def hub_for(runtime) -> Hub:
    """The hub over the deployment's transport (service/announce.py)."""
    transport = announce.transport_of(runtime.settings)
    if transport.kind == announce.REDIS:
        return Hub(RedisListener(transport.url, transport.channel))
    if transport.kind == announce.POSTGRES:
        return Hub(PostgresListener(transport.url, transport.channel))
    return Hub(PollListener(runtime.engine, runtime.settings.events_poll_seconds))
