"""What an operator asks of a running system: is it ready, and how is the work flowing.

`readiness` answers /readyz: the database and the broker each answer, within a bound.
`report` answers `pipeline status`: queue depths, live workers, the oldest job still
waiting for a worker, open holds, the outbox backlog. The broker is passed in as a
small interface (tasks.probe.BrokerProbe implements it over Celery's connection), so
this module knows nothing of Celery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Protocol

from sqlalchemy import func, select, text

from pipeline.db import aware_utc, utcnow
from pipeline.tables import credit_holds, job_dispatches, jobs

WAITING_STATUSES = ("pending", "queued")  # no worker has taken the job yet
LIVE_STATUSES = (*WAITING_STATUSES, "processing")


class Broker(Protocol):
    """The broker as these reports see it."""

    kind: str  # "redis", "amqp", "filesystem", ...

    def ping(self) -> None:
        """Raise unless the broker answers (the filesystem broker: its folder takes a file)."""

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each of our queues (not those a worker holds)."""

    def live_workers(self) -> list[str] | None:
        """Names of the workers that answered a ping; None where there is no remote control."""


def bounded(checks: dict[str, Callable[[], None]], timeout: float) -> dict[str, dict]:
    """Run each check on a thread of its own; {name: {ok, ms[, error]}} within `timeout`.

    A check still running at the deadline (a broker that accepted the connection and
    never answers) is reported as timed out and left to its own socket timeouts.
    The error is the exception's class name only: the body is public, and a message
    can carry a host name or a URL.
    """
    results: dict[str, dict] = {}
    started = time.monotonic()

    def run(name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception as exc:
            outcome = {"ok": False, "error": type(exc).__name__}
        else:
            outcome = {"ok": True}
        results[name] = {**outcome, "ms": round((time.monotonic() - started) * 1000, 1)}

    threads = [threading.Thread(target=run, args=item, daemon=True, name=f"check {item[0]}")
               for item in checks.items()]
    for thread in threads:
        thread.start()
    deadline = started + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    return {name: dict(results.get(name) or {
        "ok": False, "error": f"no answer within {timeout:g}s", "ms": round(timeout * 1000, 1)})
        for name in checks}


def _no_broker() -> None:
    raise LookupError("this process has no broker to publish to")


def _select_one(engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def readiness(engine, broker: Broker | None, *, timeout: float) -> dict:
    """{"status": "ready" | "unavailable", "checks": {"database": {...}, "broker": {...}}}."""
    checks = bounded({"database": lambda: _select_one(engine),
                      "broker": broker.ping if broker is not None else _no_broker}, timeout)
    ready = all(check["ok"] for check in checks.values())
    return {"status": "ready" if ready else "unavailable", "checks": checks}


def _age(value, now) -> float | None:
    return None if value is None else round((now - aware_utc(value)).total_seconds(), 1)


def database_status(conn) -> dict:
    """The work in the database: live jobs, the oldest still waiting, holds, the outbox."""
    now = utcnow()
    by_status = dict(conn.execute(
        select(jobs.c.status, func.count()).where(jobs.c.status.in_(LIVE_STATUSES))
        .group_by(jobs.c.status)).all())
    oldest = conn.execute(
        select(jobs.c.id, jobs.c.status, jobs.c.created_at)
        .where(jobs.c.status.in_(WAITING_STATUSES))
        .order_by(jobs.c.created_at).limit(1)).first()
    holds = conn.execute(
        select(func.count(), func.sum(credit_holds.c.amount))
        .where(credit_holds.c.status == "open")).one()
    outbox = conn.execute(
        select(func.count(), func.min(job_dispatches.c.created_at))
        .where(job_dispatches.c.sent_at.is_(None))).one()
    return {
        "jobs": {status: by_status.get(status, 0) for status in LIVE_STATUSES},
        "oldestPendingJob": None if oldest is None else {
            "jobId": str(oldest.id), "status": oldest.status,
            "ageSeconds": _age(oldest.created_at, now)},
        "openHolds": {"count": holds[0], "credits": str(holds[1] or Decimal("0"))},
        "outbox": {"unsent": outbox[0], "oldestAgeSeconds": _age(outbox[1], now)},
    }


def broker_status(broker: Broker, *, timeout: float) -> dict:
    """Whether the broker answers and, if it does, its queue depths and live workers."""
    answer = bounded({"broker": broker.ping}, timeout)["broker"]
    data = {"kind": broker.kind, **answer, "queues": None, "workers": None}
    if not answer["ok"]:
        return data
    data["queues"] = broker.queue_depths()
    data["workers"] = broker.live_workers()
    if data["workers"] is None:
        data["workersNote"] = f"the {broker.kind} broker has no remote control to ask"
    return data


def report(engine, broker: Broker, *, timeout: float) -> dict:
    """`pipeline status`. Raises the database's error when it cannot be read."""
    with engine.connect() as conn:
        data = database_status(conn)
    return {**data, "broker": broker_status(broker, timeout=timeout)}


def lines(data: dict) -> list[str]:
    """The report as a few aligned lines for a terminal."""
    jobs_, oldest = data["jobs"], data["oldestPendingJob"]
    holds, outbox, broker = data["openHolds"], data["outbox"], data["broker"]
    rows = [
        ("jobs", "  ".join(f"{status} {n}" for status, n in jobs_.items())),
        ("oldest pending", "none" if oldest is None else
         f"{oldest['ageSeconds']}s ({oldest['status']} {oldest['jobId']})"),
        ("open holds", f"{holds['count']} ({holds['credits']} credits)"),
        ("outbox", f"{outbox['unsent']} unsent" + (
            "" if outbox["oldestAgeSeconds"] is None
            else f", oldest {outbox['oldestAgeSeconds']}s")),
        ("broker", f"{broker['kind']} "
         + ("ok" if broker["ok"] else f"unreachable ({broker['error']})")),
    ]
    rows += [(f"  queue {name}", str(depth)) for name, depth in (broker["queues"] or {}).items()]
    if broker["workers"] is not None:
        rows.append(("workers", f"{len(broker['workers'])}  {' '.join(broker['workers'])}"))
    elif broker["ok"]:
        rows.append(("workers", f"unknown: {broker['workersNote']}"))
    width = max(len(label) for label, _ in rows) + 2
    return [f"{label:{width}}{value}".rstrip() for label, value in rows]
