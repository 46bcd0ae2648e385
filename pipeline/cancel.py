"""Cancel a job on a client's request: end it as `cancelled` and refund its hold in full.

One transaction, one compare-and-set on the job row: whichever ends the job first (this
cancel, the settle step, a failure, the sweeper) decides its money, and the others find it
terminal and move nothing. Remote work is not stopped here (no provider call inside a
transaction, and the API holds no provider client): the generate step sees the job
`cancelled` on its next poll or heartbeat and cancels it at the provider (Runway's
DELETE, OpenAI's video delete, ComfyUI's /interrupt and queue removal; HeyGen documents
no way to stop a render, so it runs on and is ignored).

The client is refunded in full whatever the provider charges us for the part that ran:
a job can be cancelled only while no output exists. Once the provider's result is stored,
the job is finishing and a cancel is refused (409), so a billable output is never thrown
away for free, nor charged for after a cancel.

Who cancelled and when is kept in `cancelled_by` ("API key <id>", or "deadline" for a
job past its Cancel-After) and `cancelled_at`, and repeated in the job's `error_code`
(`CANCELLED`) and `error` ("Cancelled by API key <id> at <time>."), which
`GET /v1/jobs/<id>` shows as `error: {code, message}`.

A client's deadline (the `Cancel-After` header, parsed here) is the same cancel, asked
for by the sweeper (pipeline/sweeper.py, cancel_overdue) with `by=DEADLINE`.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta

from sqlalchemy import update

from pipeline import jobevents, ledger, logcontext, telemetry, usage
from pipeline.db import iso_utc, utcnow
from pipeline.errors import Conflict, ValidationFailed
from pipeline.jobs import get_job
from pipeline.tables import TERMINAL_STATUSES, jobs

CODE = "CANCELLED"
DEADLINE = "deadline"  # cancelled_by of a job cancelled at its Cancel-After

# Cancel-After: plain seconds ("90", "2.5") or hours, minutes and seconds in that order,
# each optional, decimals allowed ("1h30m", "5m", "45s", "1.5h"): Replicate's notation.
CANCEL_AFTER_HEADER = "Cancel-After"
MIN_CANCEL_AFTER = timedelta(seconds=5)  # below the sweeper's pace it would mean nothing
MAX_CANCEL_AFTER = timedelta(hours=24)
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(rf"(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?")
_SECONDS = re.compile(_NUMBER)

log = logging.getLogger("pipeline.cancel")


class JobAlreadyFinished(Conflict):
    """The job ended (or its result is already generated): there is nothing to cancel."""

    code = "JOB_ALREADY_FINISHED"


def parse_cancel_after(text: str | None) -> timedelta | None:
    """The Cancel-After header as a duration (None without one); ValidationFailed naming
    the header when it is not a duration between MIN_CANCEL_AFTER and MAX_CANCEL_AFTER."""
    if text is None:
        return None
    value = text.strip().lower()
    seconds = _SECONDS.fullmatch(value)
    parts = None if seconds else _DURATION.fullmatch(value)
    if seconds:
        total = float(seconds.group(1))
    elif parts and value:
        hours, minutes, secs = (float(part or 0) for part in parts.groups())
        total = hours * 3600 + minutes * 60 + secs
    else:
        raise ValidationFailed(
            f"{CANCEL_AFTER_HEADER} must be a duration such as 30s, 5m, 1h30m or a number "
            "of seconds.", details={"field": CANCEL_AFTER_HEADER})
    # Compared as seconds first: a huge number would overflow a timedelta.
    if not _seconds(MIN_CANCEL_AFTER) <= total <= _seconds(MAX_CANCEL_AFTER):
        raise ValidationFailed(
            f"{CANCEL_AFTER_HEADER} must be between {_seconds(MIN_CANCEL_AFTER)} seconds "
            f"and {_seconds(MAX_CANCEL_AFTER)} seconds.",
            details={"field": CANCEL_AFTER_HEADER, "min": _seconds(MIN_CANCEL_AFTER),
                     "max": _seconds(MAX_CANCEL_AFTER)})
    return timedelta(seconds=total)


def _seconds(duration: timedelta) -> int:
    return int(duration.total_seconds())


def _reason(by: str, now) -> str:
    if by == DEADLINE:
        return f"Cancelled at its {CANCEL_AFTER_HEADER} deadline, {iso_utc(now)}."
    return f"Cancelled by {by} at {iso_utc(now)}."


def cancel_job(engine, job_id, company_id, *, by: str):
    """Cancel the company's job and refund its hold; the job's row as it ends.

    `by` names who asked ("API key <id>", or DEADLINE). Raises NotFound for another
    company's job (or none) and JobAlreadyFinished when the job is terminal or its output exists.
    """
    now = utcnow()
    with engine.begin() as conn:
        get_job(conn, job_id, company_id)  # scope first: another company's job is a 404
        ended = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.company_id == company_id,
                   jobs.c.status.not_in(TERMINAL_STATUSES), jobs.c.output_key.is_(None))
            .values(status="cancelled", error_code=CODE,
                    error=_reason(by, now), cancelled_by=by,
                    cancelled_at=now, completed_at=now, updated_at=now, wake_at=None)
            .returning(*jobs.c)
        ).first()
        if ended is None:
            job = get_job(conn, job_id, company_id)
            raise JobAlreadyFinished(
                "The job has finished or its result is already generated; it cannot be "
                "cancelled.", details={"jobId": str(job_id), "status": job.status})
        logcontext.bind_job(ended)
        # No hold yet (cancelled before the reserve step): nothing to refund, and the
        # reserve step, finding the job terminal, will take none.
        refunded = ledger.void(conn, job_id, reason=CODE)
        usage.record_finished(conn, ended, status="cancelled", finished_at=now,
                              error_code=CODE)
        jobevents.record(conn, ended, "cancelled")
    jobevents.announce(ended.id, "cancelled")
    log.info("job cancelled by %s; refunded %s", by, refunded or 0)
    telemetry.job_finished(ended, "cancelled", CODE)
    telemetry.credits("refunded", ended.provider, refunded)
    return ended
