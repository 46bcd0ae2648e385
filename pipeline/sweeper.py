"""The sweeper's use cases: relay the outbox, re-drive stuck jobs, close leftover holds.

Each works in bounded batches and, on PostgreSQL, skips rows another sweeper has
locked, so several beat-driven sweeps never fight over the same job.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, or_, select

from pipeline import idempotency, ledger, lifecycle
from pipeline import jobs as jobs_uc
from pipeline.db import utcnow
from pipeline.tables import TERMINAL_STATUSES, credit_holds, job_dispatches, jobs

log = logging.getLogger("pipeline.sweeper")


def relay_outbox(engine, publisher, *, grace_seconds: int, batch: int = 100) -> int:
    """Publish jobs whose dispatch never reached the broker (it was down, or we crashed)."""
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    sent = 0
    # The rows stay locked while we publish, so a second sweeper skips them instead of
    # publishing them twice; a broker failure ends the batch, bounding the lock time.
    with engine.begin() as conn:
        rows = conn.execute(
            select(job_dispatches.c.job_id, job_dispatches.c.queue)
            .where(job_dispatches.c.sent_at.is_(None), job_dispatches.c.created_at < cutoff)
            .order_by(job_dispatches.c.created_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            try:
                publisher.publish(row.job_id, row.queue)
            except Exception as exc:
                jobs_uc.record_dispatch_failure(conn, row.job_id, type(exc).__name__)
                log.warning("outbox relay: broker unavailable (%s); %d jobs wait",
                            type(exc).__name__, len(rows) - sent)
                break
            jobs_uc.mark_dispatched(conn, row.job_id)
            sent += 1
    return sent


def redrive_stuck(engine, publisher, *, stale_seconds: int, requeue_seconds: int,
                  batch: int = 100) -> int:
    """Publish the chain again for live jobs whose worker is gone or whose message was lost.

    - processing with a heartbeat older than `stale_seconds`: the worker died (a live one
      renews it during provider calls, uploads and GPU polls);
    - processing, released for a retry or poll whose time (`wake_at`) passed more than
      `stale_seconds` ago: that scheduled message was lost;
    - queued for longer than `requeue_seconds`: its message may be lost, or may wait in a
      backlog (so this window is long: each re-publish is a duplicate for the steps to skip).

    Every step is idempotent, so a re-driven chain skips what is done: the hold is
    found, a stored output is not generated again, a settled job is left alone.
    """
    now = utcnow()
    stale = now - timedelta(seconds=stale_seconds)
    requeue = now - timedelta(seconds=requeue_seconds)
    with engine.connect() as conn:
        rows = conn.execute(
            select(jobs.c.id, job_dispatches.c.queue)
            .join(job_dispatches, job_dispatches.c.job_id == jobs.c.id)
            .where(
                or_(
                    and_(jobs.c.status == "queued", jobs.c.updated_at < requeue),
                    and_(
                        jobs.c.status == "processing",
                        jobs.c.updated_at < stale,
                        or_(
                            jobs.c.heartbeat_at < stale,
                            and_(jobs.c.heartbeat_at.is_(None),
                                 or_(jobs.c.wake_at.is_(None), jobs.c.wake_at < stale)),
                        ),
                    ),
                )
            )
            .limit(batch)
        ).all()
    redriven = 0
    for row in rows:
        try:
            publisher.publish(row.id, row.queue)
        except Exception as exc:
            log.warning("re-drive: broker unavailable (%s)", type(exc).__name__)
            break
        lifecycle.touch(engine, row.id)
        redriven += 1
    return redriven


def close_leftover_holds(engine, *, batch: int = 100) -> int:
    """Void holds of terminal jobs that are still open (a crash between two writes)."""
    with engine.connect() as conn:
        ids = conn.execute(
            select(credit_holds.c.job_id)
            .join(jobs, jobs.c.id == credit_holds.c.job_id)
            .where(credit_holds.c.status == "open", jobs.c.status.in_(TERMINAL_STATUSES))
            .limit(batch)
        ).scalars().all()
    closed = 0
    for job_id in ids:
        with engine.begin() as conn:
            if ledger.void(conn, job_id, reason="terminal job with open hold") is not None:
                closed += 1
    return closed


def expire_holds(engine, *, batch: int = 100) -> int:
    """Fail jobs whose hold outlived its timeout, and void the hold (invariant 4)."""
    with engine.connect() as conn:
        ids = conn.execute(
            select(credit_holds.c.job_id)
            .where(credit_holds.c.status == "open", credit_holds.c.expires_at < utcnow())
            .limit(batch)
        ).scalars().all()
    for job_id in ids:
        lifecycle.fail(engine, job_id, code="HOLD_EXPIRED",
                       message="The job ran past its credit hold's timeout; the hold was voided.")
    return len(ids)


def sweep(runtime, *, batch: int = 100) -> dict[str, int]:
    settings = runtime.settings
    return {
        "dispatched": relay_outbox(runtime.engine, runtime.publisher,
                                   grace_seconds=settings.dispatch_grace_seconds, batch=batch),
        "redriven": redrive_stuck(runtime.engine, runtime.publisher,
                                  stale_seconds=settings.stale_after_seconds,
                                  requeue_seconds=settings.requeue_after_seconds, batch=batch),
        "expired": expire_holds(runtime.engine, batch=batch),
        "holds_closed": close_leftover_holds(runtime.engine, batch=batch),
        "idempotency_keys_purged": idempotency.purge_expired(runtime.engine, batch=1000),
    }
