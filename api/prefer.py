"""`Prefer: wait=N` (RFC 7240) on job submission: hold the answer until the job ends, for
at most N seconds, then answer as `GET /v1/jobs/<id>` would.

The request waits on the process's hub (service/jobhub.py) like a stream does: it reads
the job when it starts waiting, when a wake-up names the job, and once when the time is
up; never once per tick.
"""

from __future__ import annotations

import time
import uuid

from flask import Response, current_app, jsonify, request, url_for

from api.auth import current_principal
from api.events import hub, snapshot
from pipeline import jobevents

MAX_WAIT_SECONDS = 60
APPLIED_HEADER = "Preference-Applied"

PREFER_DOC = {
    "in": "header",
    "name": "Prefer",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        "`wait=N` (N whole seconds, 1 to 60; larger values count as 60) holds the response "
        "until the job has ended or N seconds have passed. An ended job answers 200 with the "
        "job as `GET /v1/jobs/{job_id}` shows it; one still running answers 202 with the same "
        "view (a superset of the usual 202 body: `jobId`, `status`, `estimatedCost` are in "
        "it) and `Location`. Either way the response carries `Preference-Applied: wait=N`. "
        "Other preferences, and a `wait` that is not a whole number from 1 up, are ignored "
        "(RFC 7240), as is `wait` on a response replayed for an `Idempotency-Key` (the "
        "stored answer is the immediate 202)."),
}


def wait_seconds(values: list[str]) -> int | None:
    """The `wait` preference of the Prefer header(s), capped at MAX_WAIT_SECONDS; None
    when there is none or it is not a whole number of seconds from 1 up.

    RFC 7240: preferences are comma-separated, each `name[=value]` followed by
    `;parameters`; names are case-insensitive, a value may be quoted, and when a
    preference comes twice the first counts."""
    for value in values:
        for preference in value.split(","):
            token = preference.split(";", 1)[0]
            name, eq, given = (part.strip() for part in token.partition("="))
            if name.lower() != "wait":
                continue
            given = given.strip('"') if eq else ""
            if not given.isascii() or not given.isdigit() or int(given) < 1:
                return None
            return min(int(given), MAX_WAIT_SECONDS)
    return None


def apply_wait(answer):
    """The submission's answer, or, under `Prefer: wait=N`, the job once it has ended or N
    seconds have passed. A replayed answer (a Response already) is left as it is."""
    seconds = wait_seconds(request.headers.getlist("Prefer"))
    if seconds is None or isinstance(answer, Response):
        return answer
    body, status, _headers = answer
    if status != 202:
        return answer
    job, view = wait_for_end(body["jobId"], seconds)
    response = jsonify(view)
    response.status_code = 200 if job.status in jobevents.TERMINAL_EVENTS else 202
    if response.status_code == 202:
        response.headers["Location"] = url_for("jobs.JobById", job_id=view["jobId"])
    response.headers[APPLIED_HEADER] = f"wait={seconds}"
    return response


def wait_for_end(job_id: str, seconds: float):
    """(row, view) of the job when it ended, or when `seconds` ran out."""
    rt = current_app.extensions["runtime"]
    company_id = current_principal().company_id
    deadline = time.monotonic() + seconds
    with hub().watch(job_id) as watch:  # before the first read: no change falls between
        while True:
            job, view = snapshot(rt, uuid.UUID(job_id), company_id)
            remaining = deadline - time.monotonic()
            if job.status in jobevents.TERMINAL_EVENTS or remaining <= 0:
                return job, view
            watch.wait(remaining)
