"""A job's attempt log: each start on a provider and how it ended, read for its company."""

from __future__ import annotations

import re

from sqlalchemy import select

from pipeline.db import iso_utc
from pipeline.jobs import get_job
from pipeline.tables import job_attempts

# `user:password@` in a URL written into an error (a ComfyUI base URL may carry one):
# the log is shown to customers, so what sits before the host goes.
_USERINFO = re.compile(r"[^\s/@:]+:[^\s/@]*@")


def list_attempts(conn, job_id, company_id) -> list[dict]:
    """The job's attempts, first to last, as clients see them.

    Another company's job raises NotFound (JOB_NOT_FOUND), as reading the job does: the
    caller learns nothing of whether it exists."""
    get_job(conn, job_id, company_id)
    rows = conn.execute(
        select(job_attempts).where(job_attempts.c.job_id == job_id)
        .order_by(job_attempts.c.number)
    ).all()
    return [attempt_view(row) for row in rows]


def attempt_view(row) -> dict:
    """One attempt. The remote id is left out: for a self-hosted provider it names the
    instance's address, which is the operators' business, not the customer's."""
    error = None
    if row.error_code or row.error:
        error = {"code": row.error_code, "message": _scrubbed(row.error)}
    return {
        "number": row.number,
        "provider": row.provider,
        "outcome": row.outcome,
        "error": error,
        "startedAt": iso_utc(row.started_at),
        "finishedAt": iso_utc(row.finished_at),
    }


def _scrubbed(message: str | None) -> str | None:
    return None if message is None else _USERINFO.sub("", message)
