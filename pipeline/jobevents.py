"""What happened to a job, told to whoever follows it: live streams, waiting requests, webhooks.

Two halves, as the telemetry port has:
- `record(conn, job, event)` runs inside the transaction that changed the job. It queues
  the job's webhook delivery, if the job has a webhook that wants this event, as a row
  that commits or rolls back with the change (an outbox: a crash after the commit still
  delivers it; a rolled-back change sends nothing). A job without a webhook costs nothing
  here: the decision is read from the row the change already returned.
- `announce(job_id, event)` runs after the commit and wakes the live listeners (SSE
  streams, `Prefer: wait` requests) through the process's installed `Announcer`. The
  message is only a wake-up: a listener reads the job from the database, which stays
  the truth, so a lost or repeated message costs a late or an extra read, never a wrong
  event.

Events, in the order a job passes them: queued, processing, progress (repeated),
then one of completed, failed, cancelled. A job's status only moves forward
(pending -> queued -> processing -> terminal), which is what lets a stream resume from an
event id without a stored history (`EventId`, `passed`; the stream is api/events.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("pipeline.jobevents")

EVENTS = ("queued", "processing", "progress", "completed", "failed", "cancelled")
TERMINAL_EVENTS = ("completed", "failed", "cancelled")


class Announcer:
    """Where `announce` sends its wake-ups; this one sends them nowhere (CLI, unit tests)."""

    def job_changed(self, job_id, event: str) -> None: ...


_announcer = Announcer()


def install(announcer: Announcer) -> None:
    """Send this process's wake-ups to `announcer`, from now on."""
    global _announcer  # noqa: PLW0603 - one per process, set at start like telemetry's
    _announcer = announcer


def installed() -> Announcer:
    return _announcer


def record(conn, job, event: str) -> None:
    """Inside the transaction that changed `job` (a row with its webhook columns): queue
    the job's webhook delivery for `event`, when it has a webhook that wants it."""
    if getattr(job, "webhook_url", None) is None:
        return
    from pipeline import webhooks

    webhooks.queue_delivery(conn, job, event)


def announce(job_id, event: str) -> None:
    """After the commit: wake whoever follows the job. Never fails the caller."""
    try:
        _announcer.job_changed(job_id, event)
    except Exception:
        log.exception("announcing %s of job %s failed", event, job_id)


# Event ids, ordered as a job passes its events, so a client's Last-Event-ID says what it
# has seen without a stored history: queued "1", processing "2", progress "3.<permille>"
# (0 to 1000, so a later progress has a larger id), the terminal event "9".
_STAGES = {"queued": 1, "processing": 2, "progress": 3,
           **dict.fromkeys(TERMINAL_EVENTS, 9)}


@dataclass(frozen=True, order=True)
class EventId:
    stage: int
    permille: int = 0

    def __str__(self) -> str:
        return f"{self.stage}.{self.permille}" if self.stage == _STAGES["progress"] else str(
            self.stage)

    @classmethod
    def parse(cls, text: str | None) -> EventId | None:
        """An id this module wrote; None for anything else (the client then gets all)."""
        stage, dot, permille = (text or "").strip().partition(".")
        if not (stage + permille).isascii() or not stage.isdigit():
            return None
        if int(stage) not in _STAGES.values():
            return None
        if int(stage) != _STAGES["progress"]:
            return None if dot else cls(int(stage))
        if not permille.isdigit() or int(permille) > 1000:
            return None
        return cls(int(stage), int(permille))


def passed(job) -> list[tuple[EventId, str]]:
    """The events a job (its row) has passed, in order, read from its timestamps, progress
    and status: what a stream replays to a client that connects late."""
    events = []
    if job.queued_at is not None:
        events.append((EventId(_STAGES["queued"]), "queued"))
    if job.started_at is not None:
        events.append((EventId(_STAGES["processing"]), "processing"))
    if job.progress is not None:
        permille = round(max(0.0, min(1.0, float(job.progress))) * 1000)
        events.append((EventId(_STAGES["progress"], permille), "progress"))
    if job.status in TERMINAL_EVENTS:
        events.append((EventId(_STAGES[job.status]), job.status))
    return events
