"""A job's webhook: checked at submit, queued with the job's change, sent signed, retried.

The path of one event:
1. `validate_subscription` at submit: the URL is a plain http(s) URL whose host resolves
   to public addresses only (pipeline.netguard), the events are known ones.
2. `queue_delivery`, inside the transaction that changed the job (pipeline.jobevents):
   one `webhook_deliveries` row, pending and due now. It commits or rolls back with the
   change, so a crash after the commit still sends it and a rolled-back change sends
   nothing. Nothing else happens on the job's path: a receiver that is down can never
   delay or fail the job.
3. `claim_due`, run every few seconds by the maintenance workers' relay: due rows are
   claimed (a token, and a lease that pushes their due time forward) and each is handed
   to a delivery task. The row is the truth: a lost task message only means the lease
   runs out and the row is claimed again.
4. `deliver`: the body is built now from the job as it is (as GET /v1/jobs/<id> shows
   it, with fresh file links), signed the Standard Webhooks way with the company's
   secret (both secrets during a rotation's grace period), and POSTed to the address the
   guard checked at this moment. A 2xx answer delivers it; anything else is retried on
   the schedule (WEBHOOK_RETRY_SCHEDULE), then the delivery fails. A refused address
   fails it at once; a name that does not resolve is retried. The `webhook-id` is the
   row's: the same on every attempt, so a receiver can drop repeats.

Progress is throttled by the unique key (job, event, sequence): a progress delivery is
queued only for the first report in each tenth (0-9%, 10-19%, ..., 100%), so a job
sends at most 11 progress webhooks however often its provider reports.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

import urllib3
from sqlalchemy import select, update
from standardwebhooks import Webhook

from pipeline import jobs as jobs_uc
from pipeline import netguard, webhook_secrets
from pipeline.db import insert_ignore, iso_utc, new_id, utcnow
from pipeline.errors import ValidationFailed
from pipeline.tables import jobs, webhook_deliveries

log = logging.getLogger("pipeline.webhooks")

EVENTS = ("start", "progress", "completed", "failed", "cancelled")
# pipeline.jobevents' names for what happened -> the webhook event it is.
FROM_JOB_EVENT = {"processing": "start", "progress": "progress", "completed": "completed",
                  "failed": "failed", "cancelled": "cancelled"}
PROGRESS_STEPS = 10
USER_AGENT = "content-pipeline-webhooks/1"
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class Policy:
    """How deliveries are made: from the settings (WEBHOOK_* in pipeline/config.py)."""

    guard: netguard.Guard
    retry_schedule: tuple[float, ...]  # seconds before each retry; then the delivery fails
    timeout: float  # connect, and each read
    secret_grace: timedelta

    @property
    def lease_seconds(self) -> float:
        """How long a claimed delivery is left to its task before the relay claims it
        again: well past the longest an attempt can take (connect + read timeouts)."""
        return 4 * self.timeout + 30

    @classmethod
    def from_settings(cls, settings, guard: netguard.Guard | None = None) -> Policy:
        return cls(guard or netguard.Guard(allow_private=settings.webhook_allow_private),
                   tuple(settings.webhook_retry_schedule), settings.webhook_timeout_seconds,
                   timedelta(seconds=settings.webhook_secret_grace_seconds))


def validate_subscription(url, events, guard: netguard.Guard) -> None:
    """Raises ValidationFailed (field `webhook` or `webhookEvents`) for a URL we will not
    call or an unknown event. Resolves the host now; `deliver` checks it again."""
    if url is None:
        if events is not None:
            raise ValidationFailed("webhookEvents needs a webhook URL.",
                                   details={"field": "webhookEvents"})
        return
    try:
        guard.check(url)
    except netguard.Refused as exc:
        raise ValidationFailed(f"The webhook URL is refused: {exc}.",
                               details={"field": "webhook", "reason": str(exc)}) from None
    if events is None:
        return
    if (not isinstance(events, list | tuple) or not events
            or any(e not in EVENTS for e in events)):
        raise ValidationFailed("webhookEvents must be a non-empty list of: "
                               + ", ".join(EVENTS) + ".",
                               details={"field": "webhookEvents", "allowed": list(EVENTS)})


def subscribed_events(events) -> list[str] | None:
    """The stored form: None for every event, else the events in their usual order."""
    return None if events is None else [e for e in EVENTS if e in set(events)]


def queue_delivery(conn, job, event: str) -> None:
    """Inside the job's transaction: a pending delivery of `event`, if the job wants it."""
    wanted = FROM_JOB_EVENT.get(event)
    if wanted is None or job.webhook_url is None:
        return
    if job.webhook_events is not None and wanted not in job.webhook_events:
        return
    sequence = 0
    if wanted == "progress":
        if job.progress is None:
            return
        sequence = min(PROGRESS_STEPS, int(job.progress * PROGRESS_STEPS))
    now = utcnow()
    insert_ignore(conn, webhook_deliveries, {
        "id": new_id(), "job_id": job.id, "company_id": job.company_id, "event": wanted,
        "sequence": sequence, "url": job.webhook_url, "status": "pending",
        "next_attempt_at": now, "created_at": now, "updated_at": now,
    }, ["job_id", "event", "sequence"])


def claim_due(engine, *, limit: int, lease_seconds: float) -> list[tuple[object, str]]:
    """Claim up to `limit` due deliveries for sending: [(id, claim token)].

    SKIP LOCKED (PostgreSQL): two relays at once claim different rows."""
    now = utcnow()
    token = secrets.token_hex(8)
    due = (select(webhook_deliveries.c.id)
           .where(webhook_deliveries.c.status == "pending",
                  webhook_deliveries.c.next_attempt_at <= now)
           .order_by(webhook_deliveries.c.next_attempt_at).limit(limit)
           .with_for_update(skip_locked=True))
    with engine.begin() as conn:
        ids = conn.execute(
            update(webhook_deliveries).where(webhook_deliveries.c.id.in_(due))
            .values(claim_token=token, updated_at=now,
                    next_attempt_at=now + timedelta(seconds=lease_seconds))
            .returning(webhook_deliveries.c.id)).scalars().all()
    return [(delivery_id, token) for delivery_id in ids]


def webhook_id(delivery_id) -> str:
    return f"msg_{delivery_id.hex}"


def deliver(engine, storage, cipher, policy: Policy, *, delivery_id, token: str,
            link_ttl: int) -> str:
    """Make one attempt at a claimed delivery: 'delivered', 'retrying', 'failed', or
    'skipped' (the claim is no longer ours: already done, or claimed again)."""
    with engine.begin() as conn:
        row = conn.execute(select(webhook_deliveries).where(
            webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.claim_token == token,
            webhook_deliveries.c.status == "pending")).first()
        if row is None:
            return "skipped"
        job = conn.execute(select(jobs).where(jobs.c.id == row.job_id)).one()
        signing = webhook_secrets.current(conn, cipher, row.company_id).signing
    # The transaction is closed: no connection is held while the receiver answers.
    payload = {"type": f"job.{row.event}", "timestamp": iso_utc(utcnow()),
               "data": jobs_uc.job_view(job, storage, link_ttl)}
    body = json.dumps(payload, separators=(",", ":"))
    try:
        answer = policy.guard.post(row.url, body.encode(), _headers(row, body, signing),
                                   timeout=policy.timeout)
    except netguard.Unresolved as exc:  # DNS trouble may pass: retried like a refused connection
        return _record(engine, row, token, policy, payload, error=str(exc))
    except netguard.Refused as exc:
        return _record(engine, row, token, policy, payload, error=f"refused: {exc}",
                       final=True)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return _record(engine, row, token, policy, payload, error=describe(exc))
    if 200 <= answer.status < 300:
        return _record(engine, row, token, policy, payload, status_code=answer.status,
                       delivered=True)
    return _record(engine, row, token, policy, payload, status_code=answer.status,
                   error=f"the receiver answered {answer.status}")


def _headers(row, body: str, signing: list[str]) -> dict[str, str]:
    msg_id, now = webhook_id(row.id), utcnow()
    signatures = " ".join(Webhook(secret).sign(msg_id, now, body) for secret in signing)
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            "webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signatures}


def describe(exc: Exception) -> str:
    """A delivery error in words, without the URL (its query may carry the receiver's
    own token)."""
    # NewConnectionError first: urllib3 makes it a subclass of ConnectTimeoutError.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        reason = getattr(exc.__context__, "strerror", None)
        return f"could not connect ({reason or 'connection failed'})"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connecting timed out"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "the receiver did not answer in time"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS failed (certificate or handshake)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "the connection broke"
    return type(exc).__name__


def _record(engine, row, token: str, policy: Policy, payload: dict, *,
            status_code: int | None = None, error: str | None = None,
            delivered: bool = False, final: bool = False) -> str:
    """Write the attempt's outcome, if the claim is still ours; the outcome's name."""
    attempts, now = row.attempts + 1, utcnow()
    values = {"attempts": attempts, "last_attempt_at": now, "updated_at": now,
              "payload": payload, "last_status_code": status_code,
              "last_error": error[:MAX_ERROR_LENGTH] if error else None, "claim_token": None}
    if delivered:
        outcome = "delivered"
        values.update(status="delivered", delivered_at=now, next_attempt_at=None)
    elif final or attempts > len(policy.retry_schedule):
        outcome = "failed"
        values.update(status="failed", next_attempt_at=None)
    else:
        outcome = "retrying"
        values["next_attempt_at"] = now + timedelta(
            seconds=policy.retry_schedule[attempts - 1])
    with engine.begin() as conn:
        conn.execute(update(webhook_deliveries).where(
            webhook_deliveries.c.id == row.id, webhook_deliveries.c.claim_token == token)
            .values(**values))
    log.log(logging.INFO if delivered else logging.WARNING,
            "webhook %s (%s) of job %s: %s after attempt %d%s", webhook_id(row.id),
            row.event, row.job_id, outcome, attempts, f": {error}" if error else "")
    return outcome


def delivery_log(conn, job_id, company_id) -> list[dict]:
    """The job's deliveries as its company sees them (NotFound for another's job)."""
    jobs_uc.get_job(conn, job_id, company_id)
    rows = conn.execute(select(webhook_deliveries)
                        .where(webhook_deliveries.c.job_id == job_id)
                        .order_by(webhook_deliveries.c.created_at,
                                  webhook_deliveries.c.sequence)).all()
    return [{
        "webhookId": webhook_id(r.id), "event": r.event, "type": f"job.{r.event}",
        "status": r.status, "attempts": r.attempts,
        "lastResponseStatus": r.last_status_code, "lastError": r.last_error,
        "createdAt": iso_utc(r.created_at), "lastAttemptAt": iso_utc(r.last_attempt_at),
        "nextAttemptAt": iso_utc(r.next_attempt_at) if r.status == "pending" else None,
        "deliveredAt": iso_utc(r.delivered_at),
    } for r in rows]
