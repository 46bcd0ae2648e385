"""Job submission and reading: validate, price, write the job with its outbox row."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import Connection, Text, bindparam, exists, select, update

from pipeline import budgets, netguard, routing, telemetry, webhooks
from pipeline.db import autocommit, iso_utc, new_id, utcnow
from pipeline.errors import InsufficientCredits, NotFound, ValidationFailed
from pipeline.pricing import PriceTable
from pipeline.tables import budgets as budgets_table
from pipeline.tables import job_dispatches, jobs, providers, wallets

CONTENT_TYPES = ("text", "image", "audio", "video")

log = logging.getLogger("pipeline.jobs")


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from the API key, never from the request body."""

    company_id: object
    user_id: object | None
    api_key_id: object | None
    scope: str = "client"


@dataclass(frozen=True)
class JobRequest:
    content_type: str
    prompt: str
    settings: dict
    provider: str | None = None
    source: str = "v1"
    # Cancel-After: the job is cancelled (the sweeper's deadline pass) if not done by then.
    cancel_after: timedelta | None = None
    # Where the job's events are sent (pipeline/webhooks.py), and which (None: all).
    webhook: str | None = None
    webhook_events: tuple[str, ...] | None = None


def validate_request(req: JobRequest, max_prompt_length: int) -> None:
    """The checks every entry point shares; raises ValidationFailed with the field named."""
    if req.content_type not in CONTENT_TYPES:
        raise ValidationFailed(
            f"Unknown content type '{req.content_type}'.",
            details={"field": "contentType", "allowed": list(CONTENT_TYPES)},
        )
    if not isinstance(req.prompt, str) or not visible(req.prompt):
        raise ValidationFailed("The prompt must not be empty (or only spaces and invisible "
                               "characters).", details={"field": "prompt"})
    if len(req.prompt) > max_prompt_length:
        raise ValidationFailed(
            f"The prompt is longer than {max_prompt_length} characters.",
            details={"field": "prompt", "maxLength": max_prompt_length,
                     "length": len(req.prompt)},
        )
    if not isinstance(req.settings, dict):
        raise ValidationFailed("settings must be a JSON object.", details={"field": "settings"})
    if req.provider is not None and not isinstance(req.provider, str):
        raise ValidationFailed("The provider must be a name (a string).",
                               details={"field": "provider"})


def visible(text: str) -> bool:
    """Whether the text has a character one could see: not only spaces, line breaks,
    control or format characters (zero-width space, BOM, bidi marks) or lone accents."""
    return any(unicodedata.category(ch)[0] not in "ZCM" for ch in text)


def submit_job(engine, registry, *, principal: Principal, req: JobRequest,
               max_prompt_length: int, routes: dict[str, str] | None = None,
               on_created: Callable[[Connection, dict], None] | None = None,
               webhook_guard: netguard.Guard | None = None) -> dict:
    """Validate, route, price and write the job and its dispatch record in one transaction.

    `routes` is the provider order per content type (settings.provider_env's ROUTE_*).
    `on_created(conn, job)` runs inside that transaction after the job is written (the
    API stores the Idempotency-Key's response there); if it raises, no job is made.

    Refuses at once (InsufficientCredits) when the wallet plainly cannot cover the
    estimate; the binding hold is taken after this commit (the API takes it at once,
    lifecycle.reserve_if_covered) or by the chain's reserve step. Publishing is the
    caller's job, after this commit.

    `webhook_guard` decides which webhook addresses may be called (the default refuses
    private ones: WEBHOOK_ALLOW_PRIVATE is the caller's to pass).
    """
    validate_request(req, max_prompt_length)
    webhooks.validate_subscription(req.webhook, req.webhook_events,
                                   webhook_guard or netguard.Guard())
    # One transaction from the route to the job: its reads need no BEGIN of their own.
    with engine.begin() as conn:
        provider = routing.choose(conn, registry, routes or {}, principal.company_id,
                                  content_type=req.content_type, requested=req.provider)
        usage = registry.estimate_usage(provider, req.content_type, req.prompt, req.settings)
        quote = _quote(conn, principal.company_id, provider)
        prices = PriceTable({} if quote.pricing is None else {provider: quote.pricing})
        estimate = prices.cost(provider, req.content_type, usage)
        if quote.credits_available < estimate:
            raise InsufficientCredits(estimate, quote.credits_available)
        if quote.has_budgets:
            budgets.check(conn, principal.company_id, principal.user_id,
                          principal.api_key_id, estimate, lock=False)
        row = {
            "id": new_id(),
            "company_id": principal.company_id,
            "user_id": principal.user_id,
            "api_key_id": principal.api_key_id,
            "provider": provider,
            "content_type": req.content_type,
            "status": "pending",
            "source": req.source,
            "prompt": req.prompt,
            "settings": req.settings,
            "estimated_cost": estimate,
            "provider_pinned": bool(req.provider),
            "cancel_after": utcnow() + req.cancel_after if req.cancel_after else None,
            "webhook_url": req.webhook,
            "webhook_events": webhooks.subscribed_events(req.webhook_events),
        }
        job = _insert_job(conn, row, registry.queue_for(provider))
        if on_created is not None:
            on_created(conn, job)
    telemetry.job_submitted(provider, req.content_type)
    return job


# The submit path's statements, built once: building a CTE's column collection costs
# more CPU than the statement takes to run. Bound names never a column's: SQLAlchemy
# would take them for that column's new value.
_QUOTE = (
    select(wallets.c.credits_available,
           select(providers.c.pricing).where(providers.c.name == bindparam("provider"))
           .scalar_subquery().label("pricing"),
           exists().where(budgets_table.c.company_id == bindparam("company_id"))
           .label("has_budgets"))
    .where(wallets.c.company_id == bindparam("company_id"))
)
# One per set of job fields (in practice, one): built on first use.
_INSERTS_WITH_OUTBOX: dict[tuple[str, ...], object] = {}


def _insert_with_outbox(fields: tuple[str, ...]):
    new_job = (jobs.insert()
               .values({name: bindparam(f"new_{name}") for name in fields})
               .returning(*jobs.c).cte("new_job"))
    outbox = job_dispatches.insert().from_select(
        [job_dispatches.c.job_id, job_dispatches.c.queue],
        select(new_job.c.id, bindparam("queue", type_=Text)),
    ).cte("new_dispatch")
    return select(new_job).add_cte(outbox)


def _quote(conn, company_id, provider: str):
    """The company's available credits, its provider's prices and whether it has any budget,
    in one read: no whole price table, and no budgets read for a company without one."""
    row = conn.execute(_QUOTE, {"company_id": company_id, "provider": provider}).first()
    if row is None:
        raise NotFound("WALLET_NOT_FOUND", "This company has no wallet.")
    return row


def _insert_job(conn, row: dict, queue: str) -> dict:
    """Write the job and its outbox row; the job as stored (its defaults filled in).

    On PostgreSQL one statement: the outbox row is inserted from the job's RETURNING, so
    both are written, or neither, by the same statement of the caller's transaction."""
    if conn.dialect.name != "postgresql":
        conn.execute(jobs.insert().values(**row))
        conn.execute(job_dispatches.insert().values(job_id=row["id"], queue=queue))
        return dict(conn.execute(select(jobs).where(jobs.c.id == row["id"])).one()._mapping)
    fields = tuple(row)
    statement = _INSERTS_WITH_OUTBOX.get(fields)
    if statement is None:
        statement = _INSERTS_WITH_OUTBOX[fields] = _insert_with_outbox(fields)
    params = {f"new_{name}": value for name, value in row.items()}
    return dict(conn.execute(statement, {**params, "queue": queue}).one()._mapping)


def dispatch(engine, publisher, job_id, queue: str, *, reserved: bool = False) -> bool:
    """Publish a committed job's chain; on a broker failure the outbox row stays unsent.
    `reserved`: the job's hold is taken already, so its chain starts at generate.

    Never raises for broker trouble: the job is safe in the database and the sweeper
    relays it once the broker is back (with the whole chain: a reserve step that finds
    the hold taken does nothing more).
    """
    try:
        publisher.publish(job_id, queue, reserved=reserved)
    except Exception as exc:
        with engine.begin() as conn:
            record_dispatch_failure(conn, job_id, type(exc).__name__)
        log.warning("job %s: broker unavailable at dispatch (%s); left to the outbox relay",
                    job_id, type(exc).__name__)
        return False
    with autocommit(engine) as conn:
        mark_dispatched(conn, job_id)
    # No "queued" wake-up: this runs inside the request that created the job, and nobody
    # can follow a job before that request has answered with its id (a stream opened
    # later reads "queued" from the row). The sweeper's relay, which queues jobs others
    # may be following, announces its own.
    return True


def _mark_statements():
    """(close the outbox row, queue the job) as two statements, and as one for PostgreSQL."""
    now = bindparam("now")
    sent = (update(job_dispatches)
            .where(job_dispatches.c.job_id == bindparam("dispatched_job"))
            .values(sent_at=now, attempts=job_dispatches.c.attempts + 1))
    queued = (update(jobs)
              .where(jobs.c.id == bindparam("dispatched_job"), jobs.c.status == "pending")
              .values(status="queued", queued_at=now, updated_at=now))
    in_one = sent.returning(job_dispatches.c.job_id).cte("sent")
    return sent, queued, queued.where(jobs.c.id.in_(select(in_one.c.job_id)))


_MARK_SENT, _MARK_QUEUED, _MARK_DISPATCHED = _mark_statements()


def mark_dispatched(conn, job_id) -> None:
    """The chain was handed to the broker: close the outbox row, move pending -> queued.

    On PostgreSQL one statement (safe in `autocommit`): the job's UPDATE reads the outbox
    row's RETURNING, so the outbox row is locked first, as in the two-statement form."""
    params = {"dispatched_job": job_id, "now": utcnow()}
    if conn.dialect.name != "postgresql":
        conn.execute(_MARK_SENT, params)
        conn.execute(_MARK_QUEUED, params)
        return
    conn.execute(_MARK_DISPATCHED, params)


def record_dispatch_failure(conn, job_id, error: str) -> None:
    conn.execute(
        update(job_dispatches)
        .where(job_dispatches.c.job_id == job_id)
        .values(attempts=job_dispatches.c.attempts + 1, last_error=error[:500])
    )


# get_job's reads, built once: every step and every GET of a job runs one.
_JOB = select(jobs).where(jobs.c.id == bindparam("job_id"))
_COMPANY_JOB = _JOB.where(jobs.c.company_id == bindparam("company_id"))


def get_job(conn, job_id, company_id=None):
    """The job row; scoped to a company when one is given (another's job is not found)."""
    if company_id is None:
        row = conn.execute(_JOB, {"job_id": job_id}).first()
    else:
        row = conn.execute(_COMPANY_JOB, {"job_id": job_id, "company_id": company_id}).first()
    if row is None:
        raise job_not_found(job_id)
    return row


def job_not_found(job_id) -> NotFound:
    """What a job the caller may not see (none, or another company's) is answered with."""
    return NotFound("JOB_NOT_FOUND", "No such job.", details={"jobId": str(job_id)})


def job_view(job, storage, link_ttl: int, queue_position: int | None = None) -> dict:
    """The job as clients see it (camelCase, costs as strings of exact decimals).

    `queue_position` is pipeline.listing's place of a waiting job in its queue."""
    result = None
    if job.result and job.status == "completed":
        result = {
            "url": storage.url(job.result["key"], link_ttl),
            "contentType": job.result["mimeType"],
            "size": job.result["size"],
            "metadata": job.result.get("metadata", {}),
        }
        if job.result.get("files"):
            # A generation that made several files: the first is `url`, the others here.
            result["files"] = [
                {"url": storage.url(f["key"], link_ttl), "contentType": f["mimeType"],
                 "size": f["size"], "metadata": f.get("metadata", {})}
                for f in job.result["files"]
            ]
    error = None
    if job.error:
        error = {"code": job.error_code or "INTERNAL_ERROR", "message": job.error}
    return {
        "jobId": str(job.id),
        "status": job.status,
        "contentType": job.content_type,
        "provider": job.provider,
        "estimatedCost": _money(job.estimated_cost),
        "actualCost": _money(job.actual_cost),
        "attempts": job.attempts,
        "progress": job.progress,
        "createdAt": iso_utc(job.created_at),
        "updatedAt": iso_utc(job.updated_at),
        "queuedAt": iso_utc(job.queued_at),
        "reservedAt": iso_utc(job.reserved_at),
        "startedAt": iso_utc(job.started_at),
        "storedAt": iso_utc(job.stored_at),
        "settledAt": iso_utc(job.settled_at),
        "completedAt": iso_utc(job.completed_at),
        "result": result,
        "preview": job.preview,
        "error": error,
        "queuePosition": queue_position,
        "cancelAfter": iso_utc(job.cancel_after),
        "cancelledBy": job.cancelled_by,
        "cancelledAt": iso_utc(job.cancelled_at),
        "input": job_input(job),
    }


def job_input(job) -> dict:
    """What the job was asked for, enough to submit it again: the provider only when the
    caller named one (a routed job is routed afresh, and may go elsewhere)."""
    given = {"contentType": job.content_type, "prompt": job.prompt,
             "settings": job.settings or {}}
    if job.provider_pinned:
        given["provider"] = job.provider
    return given


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
