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
event id without a stored history (api/events.py).
"""

from __future__ import annotations

import logging

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
