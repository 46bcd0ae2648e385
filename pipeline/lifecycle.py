"""The chain's steps as use cases: reserve, generate, store, settle, fail.

Each is idempotent: a second run finds its work done and returns. State changes are
compare-and-set on the job row; money moves go through the ledger's keyed entries.
No transaction is held open across a provider call or a storage upload.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update

from pipeline import budgets, ledger
from pipeline.db import insert_ignore, new_id, utcnow
from pipeline.errors import PipelineError
from pipeline.jobs import get_job
from pipeline.pricing import PriceTable
from pipeline.storage import object_key
from pipeline.tables import (
    TERMINAL_STATUSES,
    api_usage,
    job_attempts,
    job_dispatches,
    jobs,
    media_assets,
)

PREVIEW_CHARS = 200

log = logging.getLogger("pipeline.lifecycle")


@dataclass(frozen=True)
class Claim:
    """What the generate step should do for this delivery."""

    action: str  # "run" | "skip" (terminal or done) | "busy" (another worker holds it)
    remote_id: str | None = None
    attempts: int = 0  # provider starts for this job, every provider together
    on_provider: int = 0  # starts on the job's current provider (fallback starts anew)


def _job(engine, job_id):
    with engine.connect() as conn:
        return get_job(conn, job_id)


def reserve(engine, job_id, *, ttl_seconds: int) -> bool:
    """Hold the estimate on the wallet. False when the job is already terminal.

    Raises InsufficientCredits or BudgetExceeded (after rolling back) when the wallet or
    a budget cannot cover it.
    """
    with engine.begin() as conn:
        job = get_job(conn, job_id)
        if job.status in TERMINAL_STATUSES:
            return False
        wallet = ledger.wallet_for_company(conn, job.company_id)
        if ledger.get_hold(conn, job.id) is None:
            budgets.check(conn, job.company_id, job.user_id, job.api_key_id, job.estimated_cost)
        ledger.reserve(conn, wallet_id=wallet.id, job_id=job.id, amount=job.estimated_cost,
                       ttl_seconds=ttl_seconds)
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job.id, jobs.c.reserved_at.is_(None))
            .values(reserved_at=utcnow(), updated_at=utcnow())
        )
    return True


def claim_generation(engine, job_id, *, stale_after: int) -> Claim:
    """Take the job for this delivery, unless it is finished or alive in another worker.

    A job is claimable when it has not started, when its claim was released for a
    retry (no heartbeat), or when its heartbeat is stale (the worker died).
    """
    now = utcnow()
    with engine.begin() as conn:
        job = get_job(conn, job_id)
        if job.output_key is not None:
            return Claim("skip")
        if job.status in TERMINAL_STATUSES:
            # A remote job still running for a job we ended is the caller's to cancel.
            return Claim("skip", job.remote_id)
        fresh_start = job.remote_id is None
        taken = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                or_(
                    jobs.c.status.in_(("pending", "queued")),
                    and_(
                        jobs.c.status == "processing",
                        or_(
                            jobs.c.heartbeat_at.is_(None),
                            jobs.c.heartbeat_at < now - timedelta(seconds=stale_after),
                        ),
                    ),
                ),
            )
            .values(
                status="processing",
                attempts=jobs.c.attempts + (1 if fresh_start else 0),
                started_at=job.started_at or now,
                heartbeat_at=now,
                updated_at=now,
            )
        ).rowcount
        if not taken:
            return Claim("busy")
        attempts = job.attempts + (1 if fresh_start else 0)
        if fresh_start:
            insert_ignore(conn, job_attempts, {"id": new_id(), "job_id": job.id,
                                               "number": attempts, "provider": job.provider},
                          ["job_id", "number"])
        on_provider = conn.execute(
            select(func.count()).select_from(job_attempts)
            .where(job_attempts.c.job_id == job.id, job_attempts.c.provider == job.provider)
        ).scalar_one()
        return Claim("run", job.remote_id, attempts, on_provider)


def finish_attempt(engine, job_id, number: int, *, outcome: str, error_code: str | None = None,
                   error: str | None = None, remote_id: str | None = None) -> None:
    """Record how one provider attempt ended (succeeded, transient, rejected, ...)."""
    values = {"outcome": outcome, "error_code": error_code,
              "error": error[:1000] if error else None, "finished_at": utcnow()}
    if remote_id is not None:
        values["remote_id"] = remote_id
    with engine.begin() as conn:
        conn.execute(update(job_attempts)
                     .where(job_attempts.c.job_id == job_id, job_attempts.c.number == number)
                     .values(**values))


def _remote_state(remote_id: str | None, progress: float | None) -> dict:
    """What a provider told us about its remote job, as column values (unknowns left out)."""
    values = {}
    if remote_id is not None:
        values["remote_id"] = remote_id
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, float(progress)))
    return values


def heartbeat(engine, job_id, *, remote_id: str | None = None,
              progress: float | None = None) -> None:
    """A sign of life from a step that holds the job (with the remote id and progress)."""
    values = {"heartbeat_at": utcnow(), "updated_at": utcnow(),
              **_remote_state(remote_id, progress)}
    with engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == "processing")
                     .values(**values))


def switch_provider(engine, job_id, *, from_provider: str, to_provider: str,
                    to_queue: str) -> bool:
    """Move a job to its fallback provider: compare-and-set, so only one delivery does it.

    The outbox row follows, so a re-drive by the sweeper publishes to the new
    provider's queue, not the one the job was submitted to.
    """
    with engine.begin() as conn:
        switched = bool(conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.provider == from_provider,
                   jobs.c.status == "processing", jobs.c.output_key.is_(None))
            .values(provider=to_provider, remote_id=None, heartbeat_at=None,
                    updated_at=utcnow())
        ).rowcount)
        if switched:
            conn.execute(update(job_dispatches).where(job_dispatches.c.job_id == job_id)
                         .values(queue=to_queue))
        return switched


def release_claim(engine, job_id, *, remote_id: str | None = None,
                  progress: float | None = None) -> None:
    """Give the job back for a scheduled retry or poll, keeping a remote id if one came."""
    values = {"heartbeat_at": None, "updated_at": utcnow(), **_remote_state(remote_id, progress)}
    with engine.begin() as conn:
        conn.execute(
            update(jobs).where(jobs.c.id == job_id, jobs.c.status == "processing").values(**values)
        )


def save_output(engine, storage, job_id, output) -> str:
    """Put the provider's bytes in storage and record where; returns the key."""
    job = _job(engine, job_id)
    key = object_key(job.company_id, job.id, f"output.{output.extension}")
    storage.put(key, output.data, output.mime_type)
    record = {
        "mimeType": output.mime_type,
        "size": len(output.data),
        "sha256": hashlib.sha256(output.data).hexdigest(),
        "usage": output.usage,
        "metadata": output.metadata,
    }
    with engine.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.output_key.is_(None))
            .values(output_key=key, output=record, heartbeat_at=utcnow(), updated_at=utcnow())
        )
    return key


def arrived_late(job) -> bool:
    """The provider finished after the sweeper voided the job's expired hold.

    Such a result is not thrown away: it is stored and charged straight from the
    wallet (never through a revived hold), and the job completes after all.
    """
    return job.status == "failed" and job.error_code == "HOLD_EXPIRED" \
        and job.output_key is not None


def _live(job) -> bool:
    return job.status not in TERMINAL_STATUSES or arrived_late(job)


def store(engine, storage, job_id) -> bool:
    """Register the stored output as a media asset with its preview. False if done already."""
    job = _job(engine, job_id)
    if job.stored_at is not None or not _live(job):
        return False
    if job.output_key is None:
        raise RuntimeError(f"job {job_id} reached store without an output")
    out = job.output
    size = storage.size(job.output_key)
    if size != out["size"]:
        raise RuntimeError(
            f"stored object for job {job_id} is {size} bytes, expected {out['size']}"
        )
    preview = None
    if job.content_type == "text":
        preview = storage.get(job.output_key).decode("utf-8", "replace")[:PREVIEW_CHARS]
    result = {"key": job.output_key, "mimeType": out["mimeType"], "size": out["size"],
              "metadata": out.get("metadata", {})}
    with engine.begin() as conn:
        insert_ignore(
            conn,
            media_assets,
            {
                "id": new_id(),
                "company_id": job.company_id,
                "job_id": job.id,
                "content_type": job.content_type,
                "storage_key": job.output_key,
                "mime_type": out["mimeType"],
                "size_bytes": out["size"],
                "sha256": out["sha256"],
                "metadata": out.get("metadata", {}),
            },
            ["job_id"],
        )
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.stored_at.is_(None))
            .values(stored_at=utcnow(), preview=preview, result=result, updated_at=utcnow())
        )
    return True


def settle(engine, job_id) -> bool:
    """Debit the actual cost, release the rest, complete the job: one transaction."""
    with engine.begin() as conn:
        job = get_job(conn, job_id)
        if not _live(job):
            return False
        if job.stored_at is None:
            raise RuntimeError(f"job {job_id} reached settle before store")
        usage = job.output.get("usage", {})
        cost = PriceTable.from_db(conn).cost(job.provider, job.content_type, usage)
        now = utcnow()
        completed = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == job.status,
                   jobs.c.settled_at.is_(None))
            .values(status="completed", settled_at=now, completed_at=now, updated_at=now,
                    error=None, error_code=None, progress=1.0)
        ).rowcount
        if not completed:
            return False
        debited = ledger.settle(conn, job_id, cost)
        usage_note = {"estimatedCost": str(job.estimated_cost)}
        if debited is None:
            # The hold was voided (it expired) before the result came: charge what the
            # wallet allows now, never a revived hold; record any shortfall.
            debited = ledger.charge_late(conn, job.company_id, job_id, cost)
            usage_note.update(late=True, shortfall=str(cost - debited))
            if debited < cost:
                log.warning("job %s: late result charged %s of %s (wallet short)", job_id,
                            debited, cost)
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(actual_cost=debited))
        insert_ignore(
            conn,
            api_usage,
            {
                "id": new_id(),
                "company_id": job.company_id,
                "job_id": job.id,
                "provider": job.provider,
                "content_type": job.content_type,
                "usage": usage,
                "cost": debited,
                "metadata": usage_note,
            },
            ["job_id"],
        )
    return True


def fail(engine, job_id, *, code: str, message: str, status: str = "failed") -> bool:
    """End the job with a clear error and void its hold, in one transaction.

    False when the job was already terminal (its money was settled by that path).
    """
    now = utcnow()
    with engine.begin() as conn:
        changed = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.not_in(TERMINAL_STATUSES))
            .values(status=status, error=message[:2000], error_code=code,
                    completed_at=now, updated_at=now)
        ).rowcount
        ledger.void(conn, job_id, reason=code)
    return bool(changed)


def fail_for_credits(engine, job_id, exc: PipelineError) -> bool:
    """The hold could not be taken (wallet or budget): fail with that error's code."""
    return fail(engine, job_id, code=exc.code, message=exc.message)



def touch(engine, job_id) -> None:
    """Note that the sweeper re-drove the job, so the next sweep waits a full window."""
    with engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=utcnow()))
