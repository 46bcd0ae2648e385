"""The sweeper's use cases: relay the outbox, re-drive stuck jobs, close leftover holds.

Beat runs `sweep` every few seconds, and more than one beat may run it at once (two
maintenance hosts, or a beat restarted while the old one still sweeps). None of them
may act on a job another one is acting on, and none may hold a row lock while it
waits on the broker. So:

- The publishing sweeps (outbox relay, re-drive) claim a bounded batch first, in one
  short transaction: a single UPDATE stamps each due job's `updated_at` and returns it,
  taking only rows no other transaction holds (FOR UPDATE SKIP LOCKED on PostgreSQL)
  and re-checking on each row that it is still due. A stamped job is not due again
  for a whole window, so a second sweeper, now or a moment later, cannot claim it.
  The claim commits; only then are the jobs published, outside any transaction.
- The hold sweeps publish nothing. Each job is one short transaction whose writes are
  compare-and-sets (the job's status, the hold's `open`), with unique ledger keys
  behind them: of two sweepers racing on a job, the loser changes and counts nothing.

- The deadline sweep cancels jobs past their Cancel-After through the client's own
  cancel use case, whose compare-and-set on the job decides against a racing sweeper,
  client cancel or finish.

Every sweep is bounded by `batch` and returns how many jobs it acted on.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import and_, or_, select, text, update

from pipeline import cancel, idempotency, jobevents, ledger, lifecycle, telemetry
from pipeline import jobs as jobs_uc
from pipeline.db import utcnow
from pipeline.pricing import PriceTable
from pipeline.tables import DEADLINED, TERMINAL_STATUSES, credit_holds, job_dispatches, jobs

log = logging.getLogger("pipeline.sweeper")

# Why a re-driven job was stuck, as the log names it.
WORKER_GONE = "worker gone"  # processing, heartbeat stale
RETRY_LOST = "scheduled retry lost"  # processing, released for a retry whose time passed
MESSAGE_LOST = "message lost"  # queued, no worker took it within REQUEUE_AFTER_SECONDS

# The jobs table as the publishing sweeps' candidate queries name it, apart from the
# table their UPDATE writes.
candidate = jobs.alias("candidate")


def _claim(conn, candidates, due, *, now: datetime):
    """Stamp the jobs `candidates` selects (`candidate.id`s, a batch) for which `due(jobs)`
    still holds; return their rows.

    The candidates' SELECT skips rows other transactions hold (FOR UPDATE SKIP LOCKED);
    the UPDATE evaluates `due` again on each row as it is now, so a job another sweeper
    stamped meanwhile (its `updated_at` moved past the window) is left out.
    """
    return conn.execute(
        update(jobs)
        .where(jobs.c.id.in_(candidates.with_for_update(of=candidate, skip_locked=True)),
               due(jobs))
        .values(updated_at=now)
        .returning(jobs.c.id, jobs.c.status, jobs.c.heartbeat_at)
    ).all()


def _queues(conn, job_ids) -> dict:
    rows = conn.execute(select(job_dispatches.c.job_id, job_dispatches.c.queue)
                        .where(job_dispatches.c.job_id.in_(job_ids)))
    return {row.job_id: row.queue for row in rows}


def relay_outbox(engine, publisher, *, grace_seconds: int, batch: int = 100) -> int:
    """Publish jobs whose dispatch never reached the broker (it was down, or we crashed).

    Due: the outbox row is unsent and the job untouched for `grace_seconds` (at submit,
    the API's own publish runs within PUBLISH_TIMEOUT_SECONDS, well inside it).
    A broker failure ends the batch; jobs claimed and not yet published are due again
    one grace period later, which paces the retries while the broker is down.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=grace_seconds)

    def due(job):
        return job.c.updated_at < cutoff

    unsent = (  # through the outbox's index of unsent rows, oldest first
        select(candidate.c.id)
        .join(job_dispatches, job_dispatches.c.job_id == candidate.c.id)
        .where(job_dispatches.c.sent_at.is_(None), due(candidate))
        .order_by(job_dispatches.c.created_at)
        .limit(batch)
    )
    with engine.begin() as conn:
        claimed = _claim(conn, unsent, due, now=now)
        queues = _queues(conn, [row.id for row in claimed])
    sent = 0
    for row in claimed:
        try:
            publisher.publish(row.id, queues[row.id])
        except Exception as exc:
            with engine.begin() as conn:
                jobs_uc.record_dispatch_failure(conn, row.id, type(exc).__name__)
            log.warning("relay: broker unavailable (%s); %d claimed jobs wait %ss",
                        type(exc).__name__, len(claimed) - sent, grace_seconds)
            break
        with engine.begin() as conn:
            jobs_uc.mark_dispatched(conn, row.id)
        jobevents.announce(row.id, "queued")
        sent += 1
    if sent:
        log.info("relay: published %d jobs whose dispatch never reached the broker", sent)
    return sent


def _stuck(stale: datetime, requeue: datetime):
    def due(job):
        return or_(
            and_(job.c.status == "queued", job.c.updated_at < requeue),
            and_(
                job.c.status == "processing",
                job.c.updated_at < stale,
                or_(
                    job.c.heartbeat_at < stale,
                    and_(job.c.heartbeat_at.is_(None),
                         or_(job.c.wake_at.is_(None), job.c.wake_at < stale)),
                ),
            ),
        )

    return due


def _why(row) -> str:
    if row.status == "queued":
        return MESSAGE_LOST
    return WORKER_GONE if row.heartbeat_at is not None else RETRY_LOST


def redrive_stuck(engine, publisher, *, stale_seconds: int, requeue_seconds: int,
                  batch: int = 100) -> int:
    """Publish the chain again for live jobs whose worker is gone or whose message was lost.

    - processing with a heartbeat older than `stale_seconds`: the worker died (a live one
      renews it during provider calls, uploads and GPU polls);
    - processing, released for a retry or poll whose time (`wake_at`) passed more than
      `stale_seconds` ago: that scheduled message was lost;
    - queued for longer than `requeue_seconds`: its message may be lost, or may wait in a
      backlog (so this window is long: each re-publish is a duplicate for the steps to skip).

    The claim's stamp makes the job wait a full window before it can be re-driven again.
    Every step is idempotent, so a re-driven chain skips what is done: the hold is
    found, a stored output is not generated again, a settled job is left alone; the
    generate step counts the job's attempts and fails it past MAX_ATTEMPTS.
    A broker failure ends the batch; the jobs claimed and not published are due again
    one window later.
    """
    now = utcnow()
    due = _stuck(now - timedelta(seconds=stale_seconds),
                 now - timedelta(seconds=requeue_seconds))
    stuck = select(candidate.c.id).where(due(candidate)).order_by(candidate.c.updated_at) \
        .limit(batch)
    with engine.begin() as conn:
        claimed = _claim(conn, stuck, due, now=now)
        queues = _queues(conn, [row.id for row in claimed])
    reasons: Counter[str] = Counter()
    for row in claimed:
        try:
            publisher.publish(row.id, queues[row.id])
        except Exception as exc:
            log.warning("re-drive: broker unavailable (%s); %d claimed jobs wait a window",
                        type(exc).__name__, len(claimed) - reasons.total())
            break
        reasons[_why(row)] += 1
        log.info("re-drive: job %s published again (%s)", row.id, _why(row))
    if reasons:
        log.info("re-drive: published %d jobs again (%s)", reasons.total(),
                 ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())))
    return reasons.total()


def expire_holds(engine, *, batch: int = 100) -> int:
    """Fail live jobs whose hold outlived its timeout, and void the hold (invariant 4).

    lifecycle.fail moves the job to failed and voids its hold in one transaction, by a
    compare-and-set on the job's status: True for the one call that did it. (A terminal
    job's open hold is close_leftover_holds' case.)
    """
    with engine.connect() as conn:
        ids = conn.execute(
            select(credit_holds.c.job_id)
            .join(jobs, jobs.c.id == credit_holds.c.job_id)
            .where(credit_holds.c.status == "open", credit_holds.c.expires_at < utcnow(),
                   jobs.c.status.not_in(TERMINAL_STATUSES))
            .order_by(credit_holds.c.expires_at)
            .limit(batch)
        ).scalars().all()
    expired = sum(
        lifecycle.fail(engine, job_id, code="HOLD_EXPIRED",
                       message="The job ran past its credit hold's timeout; the hold was voided.")
        for job_id in ids
    )
    if expired:
        log.info("expire: failed %d jobs whose credit hold passed its timeout; holds refunded",
                 expired)
    return expired


def _close_hold(conn, job) -> dict[str, Decimal]:
    """Post a completed job's hold at its cost, refund a failed or cancelled one's: the
    credits moved, by movement (empty when another sweeper closed it first)."""
    if job.status != "completed":
        refunded = ledger.void(conn, job.id, reason=f"{job.status} job with an open hold")
        return {} if refunded is None else {"refunded": refunded}
    hold = ledger.get_hold(conn, job.id)
    cost = job.actual_cost
    if cost is None:  # what the settle step would have charged: the price of its usage
        usage = (job.output or {}).get("usage", {})
        cost = PriceTable.from_db(conn).cost(job.provider, job.content_type, usage)
    debited = ledger.settle(conn, job.id, cost)
    if debited is None:
        return {}
    conn.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.actual_cost.is_(None))
                 .values(actual_cost=debited))
    return {"debited": debited, "released": hold.amount - debited}


def close_leftover_holds(engine, *, batch: int = 100) -> int:
    """Close the open holds of terminal jobs (a crash between two writes, an operator's edit).

    The steps close a hold in the transaction that ends its job, so this finds few. The
    ledger closes a hold by a compare-and-set from `open`: True for the one call that did.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.status, jobs.c.provider, jobs.c.content_type,
                   jobs.c.output, jobs.c.actual_cost)
            .join(credit_holds, credit_holds.c.job_id == jobs.c.id)
            .where(credit_holds.c.status == "open", jobs.c.status.in_(TERMINAL_STATUSES))
            .limit(batch)
        ).all()
    closed: Counter[str] = Counter()
    for job in rows:
        with engine.begin() as conn:
            moved = _close_hold(conn, job)
        if moved:
            closed["settled" if job.status == "completed" else "refunded"] += 1
            for movement, amount in moved.items():  # counted once committed
                telemetry.credits(movement, job.provider, amount)
    if closed:
        log.info("holds: closed %d open holds of terminal jobs (%s)", closed.total(),
                 ", ".join(f"{how}: {n}" for how, n in sorted(closed.items())))
    return closed.total()


def overdue_jobs(now: datetime, batch: int):
    """The live jobs whose Cancel-After passed, earliest first: through ix_jobs_cancel_after,
    whose predicate (DEADLINED) the query repeats word for word so the planner can use
    it. Jobs whose output is stored are finishing and cannot be cancelled: left out."""
    return (select(jobs.c.id, jobs.c.company_id)
            .where(text(DEADLINED), jobs.c.cancel_after < now, jobs.c.output_key.is_(None))
            .order_by(jobs.c.cancel_after)
            .limit(batch))


def cancel_overdue(engine, *, batch: int = 100) -> int:
    """Cancel live jobs past their Cancel-After deadline, as a client's cancel would.

    A queued job ends and is refunded in full; a generating one ends too, and its
    generate step stops the provider's work when it next sees the job cancelled
    (pipeline/cancel.py). A job that ended meanwhile is left as it is.
    """
    with engine.connect() as conn:
        overdue = conn.execute(overdue_jobs(utcnow(), batch)).all()
    cancelled = 0
    for job in overdue:
        try:
            cancel.cancel_job(engine, job.id, job.company_id, by=cancel.DEADLINE)
        except cancel.JobAlreadyFinished:
            continue  # finished, or another sweeper or the client got there first
        cancelled += 1
    if cancelled:
        log.info("deadlines: cancelled %d jobs past their Cancel-After", cancelled)
    return cancelled


class SweepFailed(Exception):
    """One or more sweeps raised (each is logged with its traceback); the others ran."""

    def __init__(self, failed: list[str], counts: dict[str, int]):
        super().__init__(f"sweeps failed: {', '.join(failed)}")
        self.failed, self.counts = failed, counts


def sweep(runtime, *, batch: int = 100) -> dict[str, int]:
    """Run every sweep once: how many jobs (or keys) each acted on, by name.

    A sweep that raises does not stop the ones after it (a row one of them cannot
    handle must not stall the others); SweepFailed is raised once all have run.
    """
    settings, engine, publisher = runtime.settings, runtime.engine, runtime.publisher
    sweeps = {
        "dispatched": lambda: relay_outbox(
            engine, publisher, grace_seconds=settings.dispatch_grace_seconds, batch=batch),
        "redriven": lambda: redrive_stuck(
            engine, publisher, stale_seconds=settings.stale_after_seconds,
            requeue_seconds=settings.requeue_after_seconds, batch=batch),
        "expired": lambda: expire_holds(engine, batch=batch),
        "holds_closed": lambda: close_leftover_holds(engine, batch=batch),
        "deadlines_cancelled": lambda: cancel_overdue(engine, batch=batch),
        "idempotency_keys_purged": lambda: idempotency.purge_expired(engine, batch=1000),
    }
    counts: dict[str, int] = {}
    failed: list[str] = []
    for name, run in sweeps.items():
        try:
            counts[name] = run()
        except Exception:
            log.exception("sweep %s failed; the other sweeps still run", name)
            failed.append(name)
    if any(counts.values()) or failed:
        log.info("sweep: %s", counts)
    if failed:
        raise SweepFailed(failed, counts)
    return counts
