"""The chain's steps as use cases: reserve, generate, store, settle, fail.

Each is idempotent: a second run finds its work done and returns. State changes are
compare-and-set on the job row; money moves go through the ledger's keyed entries.
No transaction is held open across a provider call or a storage upload.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, func, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError, OperationalError

from pipeline import (
    budgets,
    catalogue,
    circuits,
    jobevents,
    ledger,
    logcontext,
    telemetry,
    usage,
)
from pipeline.config import credits
from pipeline.db import autocommit, aware_utc, insert_ignore, new_id, utcnow
from pipeline.errors import NotFound, PipelineError
from pipeline.jobs import get_job, job_not_found
from pipeline.pricing import PriceTable
from pipeline.storage import object_key
from pipeline.tables import (
    TERMINAL_STATUSES,
    credit_holds,
    job_attempts,
    job_dispatches,
    jobs,
    media_assets,
    provider_circuits,
    provider_keys,
    providers,
    wallets,
)
from pipeline.tables import budgets as budget_rows

PREVIEW_CHARS = 200

log = logging.getLogger("pipeline.lifecycle")


@dataclass(frozen=True)
class Claim:
    """This delivery holds the job: start the provider (no remote id yet) or poll it."""

    job: Any  # the job's row as the claim left it
    remote_id: str | None
    deadline_at: datetime | None
    attempts: int  # provider starts so far; a poll belongs to the latest one
    # Read by the claim's own statement on PostgreSQL (None elsewhere: read them then):
    open_circuits: frozenset[str] | None = None  # providers and instances cooling down
    sealed_key: str | None = None  # the company's key for the provider, still encrypted

    @property
    def fresh_start(self) -> bool:
        return self.remote_id is None

    @property
    def key_read(self) -> bool:
        """Whether the claim's statement read the company's key (both reads or neither):
        then a None sealed_key means the company has none."""
        return self.open_circuits is not None


def _job(engine, job_id):
    with autocommit(engine) as conn:
        return get_job(conn, job_id)


# reserve()'s first statement: mark a job that has not ended as reserved (a replay keeps
# the first time), which takes the job row's lock until the commit, and read what the
# steps after it need: the job's columns it uses, whether this statement was the first
# to mark it (its reserved_at is this statement's own time), the company's wallet,
# whether a hold exists, whether the company has any budget at all (most have none, and
# then there is no budget to lock). Built once: this runs per reservation.
_NOW = bindparam("now")
_RESERVE_MARK = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.status.not_in(TERMINAL_STATUSES))
    .values(reserved_at=func.coalesce(jobs.c.reserved_at, _NOW),
            updated_at=case((jobs.c.reserved_at.is_(None), _NOW), else_=jobs.c.updated_at))
    .returning(
        jobs.c.id, jobs.c.status, jobs.c.company_id, jobs.c.user_id, jobs.c.api_key_id,
        jobs.c.provider, jobs.c.content_type, jobs.c.estimated_cost,
        (jobs.c.reserved_at == _NOW).label("first"),
        select(wallets.c.id).where(wallets.c.company_id == jobs.c.company_id)
        .scalar_subquery().label("wallet_id"),
        select(credit_holds.c.id).where(credit_holds.c.job_id == jobs.c.id)
        .exists().label("held"),
        select(budget_rows.c.id).where(budget_rows.c.company_id == jobs.c.company_id)
        .exists().label("budgeted"))
)


def reserve(engine, job_id, *, ttl_seconds: int) -> bool:
    """Hold the estimate on the wallet. False when the job is already terminal.

    Raises InsufficientCredits or BudgetExceeded (after rolling back) when the wallet or
    a budget cannot cover it. On PostgreSQL most reservations are one statement
    (_RESERVE_AT_ONCE); what it leaves to decide takes the transaction below.
    """
    if engine.dialect.name == "postgresql":
        done = _reserve_at_once(engine, job_id, ttl_seconds)
        if done is not None:
            return done
    with engine.begin() as conn:
        # Lock the job first: a cancel (or any fail) ending it meanwhile waits for this
        # hold, then voids it, or ends it first and this finds it terminal. Without the
        # lock a hold could be taken for a job that a cancel had just ended. The mark
        # comes before the wallet is touched: the wallet row's lock, taken by the
        # ledger's UPDATE, is held to the commit and every reservation on this wallet
        # waits on it, so nothing that can come before it comes after.
        job = conn.execute(_RESERVE_MARK, {"job_id": job_id, "now": utcnow()}).first()
        if job is None:  # ended (False), or no such job (NotFound, as get_job says it)
            get_job(conn, job_id)
            return False
        logcontext.bind_job(job)
        first = job.first
        if job.wallet_id is None:
            raise NotFound("WALLET_NOT_FOUND", "This company has no wallet.")
        if not job.held and job.budgeted:
            budgets.check(conn, job.company_id, job.user_id, job.api_key_id, job.estimated_cost)
        ledger.reserve(conn, wallet_id=job.wallet_id, job_id=job.id,
                       amount=job.estimated_cost, ttl_seconds=ttl_seconds)
    if first:  # this delivery took the hold (a replay found it)
        _held(job)
    return True


def reserve_if_covered(engine, job_id, *, ttl_seconds: int) -> bool:
    """The hold, right after the submit's commit, when one statement can take it: True
    when the job holds its credits now (its chain needs no reserve step).

    False whenever the reserve step must decide: a short wallet (it fails the job
    cleanly), a company with budgets (checked there under their lock), the embedded
    SQLite database, and a database that failed the statement (the job is committed
    already: its request must not fail now; a hold taken after all is found there).
    """
    if engine.dialect.name != "postgresql":
        return False
    try:
        return bool(_reserve_at_once(engine, job_id, ttl_seconds))
    except OperationalError as exc:
        log.warning("job %s: no hold at submit (%s); the reserve step takes it", job_id,
                    type(exc).__name__)
        return False


def _held(job) -> None:
    """Told once per job, by the delivery that took its hold."""
    telemetry.credits("held", job.provider, job.estimated_cost)
    log.info("credits held: %s", job.estimated_cost)


# The whole reservation as ONE statement, committed on its own, for a company that has a
# wallet and no budgets (most): mark the job reserved (the first time kept), which takes
# its row's lock as the transactional path's first statement does, then, when the job has
# no hold yet, write the hold, the reservation entry, and last the wallet's move. Each
# step reads the rows the one before it returns, so PostgreSQL runs them in that order
# (the move reads the entry, not the hold: otherwise the entry's insert, with its four
# indexes, may run after the move, inside the wallet's lock; a hold of zero has no entry
# and leaves the wallet alone). The job's lock comes before the wallet's, and the
# wallet's row, which every reservation on this wallet waits for, is locked only for
# the last write and the commit. The wallet's CHECK
# (credits_available >= 0) is the balance guard: a short wallet fails the statement whole
# and nothing is written, the mark included. So does a second delivery racing this one,
# on the hold's unique job_id or the entry's unique key. A job this statement leaves
# alone (ended, unknown, budgeted, no wallet) and a failed statement go the
# transactional path, which tells them apart.
_ENDED = ", ".join(f"'{status}'" for status in TERMINAL_STATUSES)  # constants, not input
_RESERVE_AT_ONCE = text(f"""
    WITH job AS (
        UPDATE jobs j
        SET reserved_at = COALESCE(j.reserved_at, :now),
            updated_at = CASE WHEN j.reserved_at IS NULL THEN :now ELSE j.updated_at END
        WHERE j.id = :job_id AND j.status NOT IN ({_ENDED})
          AND (EXISTS (SELECT FROM credit_holds h WHERE h.job_id = :job_id)
               OR (EXISTS (SELECT FROM wallets w WHERE w.company_id = j.company_id)
                   AND NOT EXISTS (SELECT FROM budgets b WHERE b.company_id = j.company_id)))
        RETURNING j.id, j.status, j.company_id, j.user_id, j.api_key_id, j.provider,
                  j.content_type, j.estimated_cost, j.reserved_at = :now AS first,
                  EXISTS (SELECT FROM credit_holds h WHERE h.job_id = :job_id) AS held),
    hold AS (
        INSERT INTO credit_holds (id, wallet_id, job_id, amount, expires_at)
        SELECT :hold_id, w.id, job.id, job.estimated_cost, :expires_at
        FROM job JOIN wallets w ON w.company_id = job.company_id
        WHERE NOT job.held
        RETURNING wallet_id, amount),
    entry AS (
        INSERT INTO transactions (id, wallet_id, job_id, type, amount, idempotency_key)
        SELECT :entry_id, hold.wallet_id, job.id, 'reservation', hold.amount,
               'reserve:' || CAST(job.id AS text)
        FROM job, hold WHERE hold.amount > 0
        RETURNING wallet_id, amount),
    moved AS (
        UPDATE wallets w
        SET credits_available = w.credits_available - entry.amount,
            credits_held = w.credits_held + entry.amount, updated_at = :now
        FROM entry WHERE w.id = entry.wallet_id)
    SELECT * FROM job""")


def _reserve_at_once(engine, job_id, ttl_seconds: int) -> bool | None:
    """reserve() in one round trip; None when the transactional path must decide."""
    now = utcnow()
    params = {"job_id": job_id, "now": now, "hold_id": new_id(), "entry_id": new_id(),
              "expires_at": now + timedelta(seconds=ttl_seconds)}
    try:
        with autocommit(engine) as conn:
            job = conn.execute(_RESERVE_AT_ONCE, params).first()
    except IntegrityError:
        # The statement failed whole and wrote nothing: a short wallet (the path below
        # refuses it) or another delivery's hold or entry (the path below finds it).
        return None
    if job is None:
        return None  # ended, unknown, budgeted or without a wallet: the path below decides
    logcontext.bind_job(job)
    if job.first:
        _held(job)
    return True


# claim_generation's statement, built once (it runs per generate delivery): take a job
# that has not started, whose claim was released (no heartbeat), or whose heartbeat is
# older than :stale_before, and no output is recorded for it yet.
_CLAIM = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job_id"),
        jobs.c.output_key.is_(None),
        or_(
            jobs.c.status.in_(("pending", "queued")),
            and_(
                jobs.c.status == "processing",
                or_(jobs.c.heartbeat_at.is_(None),
                    jobs.c.heartbeat_at < bindparam("stale_before")),
            ),
        ),
    )
    .values(status="processing", started_at=func.coalesce(jobs.c.started_at, _NOW),
            heartbeat_at=_NOW, wake_at=None, updated_at=_NOW)
    .returning(*jobs.c)
)
# On PostgreSQL the claim also reads what a start reads next, so neither is a round trip
# of its own: the circuits open at this moment, and the company's sealed key for the
# job's provider (decrypted by the caller, only when it calls a keyed provider).
_CLAIM_PG = _CLAIM.returning(
    select(func.array_agg(provider_circuits.c.provider))
    .where(provider_circuits.c.opened_until > _NOW)
    .scalar_subquery().label("open_circuits"),
    select(provider_keys.c.key_data)
    .where(provider_keys.c.company_id == jobs.c.company_id,
           provider_keys.c.provider == jobs.c.provider)
    .correlate(jobs).scalar_subquery().label("sealed_key"),
)
_CLAIM_PG_WITHOUT_WEBHOOK = _CLAIM_PG.where(jobs.c.webhook_url.is_(None))


def claim_generation(engine, job_id, *, stale_after: int) -> Claim | None:
    """Take the job for this delivery; None when it is finished or alive in another worker.

    A job is claimable when it has not started, when its claim was released for a
    scheduled retry or poll (no heartbeat), or when its heartbeat is stale (the worker
    died). Start versus poll is read from the row this same statement claims, so two
    deliveries can never both decide to start.
    """
    now = utcnow()
    params = {"job_id": job_id, "now": now,
              "stale_before": now - timedelta(seconds=stale_after)}
    # A job without a webhook has no event to record with its claim: the claim is one
    # statement, committed on its own (no BEGIN and COMMIT around it). A job with one,
    # and a job this leaves alone, take the transaction below.
    row = None
    postgres = engine.dialect.name == "postgresql"
    if postgres:
        with autocommit(engine) as conn:
            row = conn.execute(_CLAIM_PG_WITHOUT_WEBHOOK, params).first()
    if row is None:
        with engine.begin() as conn:
            row = conn.execute(_CLAIM_PG if postgres else _CLAIM, params).first()
            if row is not None and aware_utc(row.started_at) == now:
                jobevents.record(conn, row, "processing")
    first = row is not None and aware_utc(row.started_at) == now  # it waited until now
    if row is None:
        return None
    if first:
        telemetry.job_started(catalogue.queue_for(row.provider), row.queued_at or row.created_at)
        jobevents.announce(row.id, "processing")
    claim = Claim(row, row.remote_id, aware_utc(row.deadline_at), row.attempts)
    if postgres:
        claim = replace(claim, open_circuits=frozenset(row.open_circuits or ()),
                        sealed_key=row.sealed_key)
    return claim


# begin_attempt's three statements as one. The count reads the snapshot from before the
# INSERT, so the row this statement adds (when it is new) is counted by adding it.
_BEGIN_ATTEMPT = text("""
    WITH bumped AS (
        UPDATE jobs SET attempts = attempts + 1, deadline_at = :deadline_at, updated_at = :now
        WHERE id = CAST(:job_id AS uuid)
        RETURNING attempts),
    added AS (
        INSERT INTO job_attempts (id, job_id, number, provider)
        SELECT CAST(:id AS uuid), CAST(:job_id AS uuid), attempts, CAST(:provider AS text)
        FROM bumped
        ON CONFLICT (job_id, number) DO NOTHING
        RETURNING id)
    SELECT bumped.attempts,
           (SELECT count(*) FROM job_attempts
            WHERE job_id = CAST(:job_id AS uuid) AND provider = :provider)
           + (SELECT count(*) FROM added) AS on_provider
    FROM bumped""")


def begin_attempt(engine, job_id, provider: str, *, deadline_at: datetime) -> tuple[int, int]:
    """Count a provider start (the claim holder's alone): (attempts, starts on this provider).

    Redeliveries count too (a worker killed mid-call starts again), which is what bounds
    them: Celery has no redelivery limit of its own.
    """
    now = utcnow()
    if engine.dialect.name == "postgresql":
        with autocommit(engine) as conn:  # one statement: atomic on its own
            row = conn.execute(_BEGIN_ATTEMPT, {
                "job_id": job_id, "deadline_at": deadline_at, "now": now, "id": new_id(),
                "provider": provider}).one()
        return row.attempts, row.on_provider
    with engine.begin() as conn:
        attempts = conn.execute(
            update(jobs).where(jobs.c.id == job_id)
            .values(attempts=jobs.c.attempts + 1, deadline_at=deadline_at, updated_at=now)
            .returning(jobs.c.attempts)
        ).scalar_one()
        insert_ignore(conn, job_attempts, {"id": new_id(), "job_id": job_id, "number": attempts,
                                           "provider": provider}, ["job_id", "number"])
        on_provider = conn.execute(
            select(func.count()).select_from(job_attempts)
            .where(job_attempts.c.job_id == job_id, job_attempts.c.provider == provider)
        ).scalar_one()
    return attempts, on_provider


def finish_attempt(engine, job_id, number: int, *, outcome: str, error_code: str | None = None,
                   error: str | None = None, remote_id: str | None = None) -> None:
    """Record how one provider attempt ended (succeeded, transient, rejected, ...)."""
    with autocommit(engine) as conn:
        conn.execute(_FINISH_ATTEMPT, _attempt_params(
            job_id, number, outcome=outcome, error_code=error_code, error=error,
            remote_id=remote_id, finished_at=utcnow()))


def _attempt_params(job_id, number: int, *, outcome: str, remote_id: str | None,
                    finished_at: datetime, error_code: str | None = None,
                    error: str | None = None) -> dict:
    return {"b_job_id": job_id, "b_number": number, "b_outcome": outcome,
            "b_error_code": error_code, "b_error": error[:1000] if error else None,
            "b_finished_at": finished_at, "b_remote_id": remote_id}


# finish_attempt's statement, built once; a remote id not given keeps the one recorded.
_FINISH_ATTEMPT = (
    update(job_attempts)
    .where(job_attempts.c.job_id == bindparam("b_job_id"),
           job_attempts.c.number == bindparam("b_number"))
    .values(outcome=bindparam("b_outcome"), error_code=bindparam("b_error_code"),
            error=bindparam("b_error"), finished_at=bindparam("b_finished_at"),
            remote_id=func.coalesce(
                bindparam("b_remote_id", type_=job_attempts.c.remote_id.type),
                job_attempts.c.remote_id))
)


def _remote_state(remote_id: str | None, progress: float | None) -> dict:
    """What a provider told us about its remote job, as column values (unknowns left out).

    Progress only moves forward: a provider that reports per step or per node, or a
    restarted worker that hears less than its predecessor, never makes it go back.
    """
    values = {}
    if remote_id is not None:
        values["remote_id"] = remote_id
    if progress is not None:
        fraction = _fraction(progress)
        values["progress"] = case(
            (or_(jobs.c.progress.is_(None), jobs.c.progress < fraction), fraction),
            else_=jobs.c.progress,
        )
    return values


def heartbeat(engine, job_id, *, remote_id: str | None = None,
              progress: float | None = None) -> bool:
    """A sign of life from a step that holds the job; False when it is no longer processing."""
    values = {"heartbeat_at": utcnow(), "updated_at": utcnow(),
              **_remote_state(remote_id, progress)}
    return _update_processing(engine, job_id, values, progress)


def _fraction(progress: float) -> float:
    """A provider's progress as stored: a fraction from 0 to 1."""
    return max(0.0, min(1.0, float(progress)))


def _update_processing(engine, job_id, values: dict, progress: float | None) -> bool:
    """Update a processing job; a reported progress is an event. False when not processing."""
    stmt = update(jobs).where(jobs.c.id == job_id, jobs.c.status == "processing").values(**values)
    if progress is None:
        with autocommit(engine) as conn:  # one UPDATE, and no event to record with it
            return bool(conn.execute(stmt).rowcount)
    # Progress only moves forward: when the job already has this much, the beat is a sign
    # of life and no event (no webhook row, no wake-up for the streams to re-read on).
    with autocommit(engine) as conn:
        if conn.execute(stmt.where(jobs.c.progress >= _fraction(progress))).rowcount:
            return True
    with engine.begin() as conn:
        row = conn.execute(stmt.returning(*jobs.c)).first()
        if row is not None:
            jobevents.record(conn, row, "progress")
    if row is not None:
        jobevents.announce(job_id, "progress")
    return row is not None


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
                    deadline_at=None, progress=None, updated_at=utcnow())
        ).rowcount)
        if switched:
            conn.execute(update(job_dispatches).where(job_dispatches.c.job_id == job_id)
                         .values(queue=to_queue))
        return switched


def release_claim(engine, job_id, *, wake_in: float = 0.0, remote_id: str | None = None,
                  progress: float | None = None) -> bool:
    """Give the job back for a retry or poll due in `wake_in` seconds, keeping a remote id.

    `wake_at` tells the sweeper when the scheduled message is due, so a job waiting out a
    long Retry-After is not mistaken for one whose message was lost. False when the job
    is no longer processing (cancelled, or failed, while the call ran).
    """
    now = utcnow()
    values = {"heartbeat_at": None, "updated_at": now,
              "wake_at": now + timedelta(seconds=wake_in), **_remote_state(remote_id, progress)}
    return _update_processing(engine, job_id, values, progress)


def _file_record(data: bytes, mime_type: str, metadata: dict) -> dict:
    return {"mimeType": mime_type, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "metadata": metadata}


@dataclass(frozen=True)
class Succeeded:
    """The provider attempt whose output save_output records: it ended well, and the
    circuit it ran on (a provider, or a provider's instance) counts no failure now."""

    attempt: int  # 0 when the job counted none (nothing to close)
    remote_id: str | None
    circuit: str


def save_output(engine, storage, job, output, succeeded: Succeeded | None = None) -> str:
    """Put the provider's bytes (every file of them) in storage and record where; with
    `succeeded`, also close that attempt and reset its circuit.

    Raises the storage's errors (`StorageError.retryable` says whether to try again);
    puts are idempotent (same key, same bytes), so a retry simply writes them again.
    """
    key = object_key(job.company_id, job.id, f"output.{output.extension}")
    extra = []
    for number, more in enumerate(output.more, start=2):
        more_key = object_key(job.company_id, job.id, f"output-{number}.{more.extension}")
        storage.put(more_key, more.data, more.mime_type)
        extra.append({"key": more_key,
                      **_file_record(more.data, more.mime_type, more.metadata)})
    storage.put(key, output.data, output.mime_type)
    record = {**_file_record(output.data, output.mime_type, output.metadata),
              "usage": output.usage}
    if extra:
        record["files"] = extra
    now = utcnow()
    # b_: a key named as a column of a table this updates would become a SET clause.
    params = {"b_job_id": job.id, "b_output_key": key, "b_output": record, "now": now}
    postgres = engine.dialect.name == "postgresql"
    if succeeded is not None and postgres:
        params.update(_attempt_params(job.id, succeeded.attempt, outcome="succeeded",
                                      remote_id=succeeded.remote_id, finished_at=now),
                      circuit=succeeded.circuit)
    with autocommit(engine) as conn:
        conn.execute(_SAVE_AND_CLOSE if succeeded is not None and postgres else _SAVE_OUTPUT,
                     params)
    if succeeded is not None and not postgres:  # SQLite has no writes inside a WITH
        circuits.record_success(engine, succeeded.circuit)
        if succeeded.attempt:
            finish_attempt(engine, job.id, succeeded.attempt, outcome="succeeded",
                           remote_id=succeeded.remote_id)
    return key


# save_output's record, built once: the first output recorded stays.
_SAVE_OUTPUT = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_job_id"), jobs.c.output_key.is_(None))
    .values(output_key=bindparam("b_output_key"), output=bindparam("b_output"),
            heartbeat_at=_NOW, updated_at=_NOW)
)
# The same, with the attempt's close and the circuit's reset in its WITH: one statement
# where the three were three round trips, each still a write on its own row.
_SAVE_AND_CLOSE = _SAVE_OUTPUT.add_cte(_FINISH_ATTEMPT.cte("attempt"),
                                       circuits.RESET.cte("circuit"))


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
    return _store(engine, storage, _job(engine, job_id))


def finish(engine, storage, job_id) -> bool:
    """store() then settle() (the finish task), reading the job once for both: settle's
    read (the job, its prices, its open hold) serves store too. A plain read, as it is
    inside settle's transaction: settle's completion is a compare-and-set on what it read.
    """
    with autocommit(engine) as conn:
        job = conn.execute(_SETTLE_READ, {"job_id": job_id}).first()
    if job is None:
        raise job_not_found(job_id)
    _store(engine, storage, job)
    return settle(engine, job_id, read=job)


def _store(engine, storage, job) -> bool:
    job_id = job.id
    logcontext.bind_job(job)
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
    if out.get("files"):
        result["files"] = [{k: f[k] for k in ("key", "mimeType", "size", "metadata")}
                           for f in out["files"]]
    asset = {
        "id": new_id(),
        "company_id": job.company_id,
        "job_id": job.id,
        "content_type": job.content_type,
        "storage_key": job.output_key,
        "mime_type": out["mimeType"],
        "size_bytes": out["size"],
        "sha256": out["sha256"],
        "metadata": out.get("metadata", {}),
    }
    if engine.dialect.name == "postgresql":
        # Both writes in one statement (the asset as a CTE), atomic on its own.
        with autocommit(engine) as conn:
            conn.execute(_STORE, {**{f"a_{k}": v for k, v in asset.items()},
                                  "job_id": job_id, "now": utcnow(), "b_preview": preview,
                                  "b_result": result})
        return True
    with engine.begin() as conn:
        insert_ignore(conn, media_assets, asset, ["job_id"])
        conn.execute(_STORED, {"job_id": job_id, "now": utcnow(), "b_preview": preview,
                               "b_result": result})
    return True


# store's job update, built once; on PostgreSQL the media asset (its unique job_id makes
# a replay add nothing) rides in the same statement as a CTE.
_STORED = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.stored_at.is_(None))
    .values(stored_at=_NOW, preview=bindparam("b_preview"), result=bindparam("b_result"),
            updated_at=_NOW)
)
_STORE = (
    _STORED
    .add_cte(postgresql.insert(media_assets)
             .values(**{name: bindparam(f"a_{name}", type_=media_assets.c[name].type)
                        for name in ("id", "company_id", "job_id", "content_type",
                                     "storage_key", "mime_type", "size_bytes", "sha256",
                                     "metadata")})
             .on_conflict_do_nothing(index_elements=["job_id"])
             .returning(media_assets.c.id)
             .cte("asset"))
)


# settle's read, built once: the job, its provider's prices (not the whole price table)
# and its open hold's amount, in one statement.
_SETTLE_READ = select(
    jobs,
    select(providers.c.pricing).where(providers.c.name == jobs.c.provider)
    .scalar_subquery().label("prices"),
    select(credit_holds.c.amount).where(credit_holds.c.job_id == jobs.c.id,
                                        credit_holds.c.status == "open")
    .scalar_subquery().label("held_amount"),
).where(jobs.c.id == bindparam("job_id"))

# settle's compare-and-set to completed, built once (`was`: the status it read).
_COMPLETE = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.status == bindparam("was"),
           jobs.c.settled_at.is_(None))
    .values(status="completed", settled_at=_NOW, completed_at=_NOW, updated_at=_NOW,
            error=None, error_code=None, progress=1.0,
            actual_cost=bindparam("expected", type_=jobs.c.actual_cost.type))
)


# On PostgreSQL, settle's writes in one statement inside its transaction: the job's
# compare-and-set to completed (as _COMPLETE), the ledger's settle, gated on that
# completion, and the usage and metrics rows, gated on the debit being the one expected
# from the read (the hold still open). Whatever the statement left undone (no open hold:
# a late result) settle does after it, statement by statement, in the same transaction.
_SETTLE_AND_COMPLETE = text(f"""
    WITH completed AS (
        UPDATE jobs SET status = 'completed', settled_at = :now, completed_at = :now,
                        updated_at = :now, error = NULL, error_code = NULL, progress = 1.0,
                        actual_cost = CAST(:expected AS numeric)
        WHERE id = CAST(:job_id AS uuid) AND status = CAST(:was AS text)
              AND settled_at IS NULL
        RETURNING id),
    {ledger.settle_ctes(gate="EXISTS (SELECT FROM completed)")},
    {usage.finished_ctes(gate="EXISTS (SELECT FROM split "
                               "WHERE split.debit = CAST(:expected AS numeric))")}
    SELECT (SELECT count(*) FROM completed) AS completed, {ledger.SETTLE_COLUMNS},
           (SELECT count(*) FROM usage) + (SELECT count(*) FROM metric) AS recorded
    FROM (SELECT) AS one LEFT JOIN split ON TRUE""").bindparams(*usage.FINISHED_TYPES)


def settle(engine, job_id, *, read=None) -> bool:
    """Debit the actual cost, release the rest, complete the job: one transaction.

    `read`: the job as _SETTLE_READ returned it to finish(), which stored its output since
    (so that row's stored_at may still be empty).
    """
    with engine.begin() as conn:
        job = read if read is not None else conn.execute(_SETTLE_READ,
                                                         {"job_id": job_id}).first()
        if job is None:
            raise job_not_found(job_id)
        logcontext.bind_job(job)
        if not _live(job):
            return False
        if job.stored_at is None and read is None:
            raise RuntimeError(f"job {job_id} reached settle before store")
        output_usage = job.output.get("usage", {})
        cost = PriceTable({job.provider: job.prices or {}}).cost(
            job.provider, job.content_type, output_usage)
        # What ledger.settle will debit when the hold is still open (written with the
        # completion; corrected below in the rare case the ledger decides otherwise).
        expected = None if job.held_amount is None else min(cost, job.held_amount)
        now = utcnow()
        usage_note = {"estimatedCost": str(job.estimated_cost)}
        recorded = False
        if conn.dialect.name == "postgresql":
            # Written only when the ledger debits `expected`; in its form, as the ledger
            # returns it (six places).
            rows = usage.finished_params(*usage.finished_rows(
                job, status="completed", finished_at=now,
                cost=None if expected is None else credits(expected),
                usage=output_usage, note=usage_note))
            done = conn.execute(_SETTLE_AND_COMPLETE, {
                **ledger.settle_params(job_id, cost, now), **rows, "was": job.status,
                "expected": expected}).one()
            if not done.completed:
                return False
            debited = ledger.settled(done, job_id)
            recorded = done.recorded == 2
        else:
            completed = conn.execute(_COMPLETE, {"job_id": job_id, "was": job.status,
                                                 "now": now, "expected": expected}).rowcount
            if not completed:
                return False
            debited = ledger.settle(conn, job_id, cost)
        jobevents.record(conn, job, "completed")
        # The hold is the estimate; what the debit left of it went back to the wallet.
        released = None if debited is None else job.estimated_cost - debited
        if debited is None:
            # The hold was voided (it expired) before the result came: charge what the
            # wallet allows now, never a revived hold; record any shortfall.
            debited = ledger.charge_late(conn, job.company_id, job_id, cost)
            usage_note.update(late=True, shortfall=str(cost - debited))
            if debited < cost:
                log.warning("job %s: late result charged %s of %s (wallet short)", job_id,
                            debited, cost)
        if debited != expected:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(actual_cost=debited))
        # api_usage and the metrics row, once: this transaction's compare-and-set ended it.
        if not recorded:
            usage.record_finished(conn, job, status="completed", finished_at=now,
                                  cost=debited, usage=output_usage, note=usage_note,
                                  replace="late" in usage_note)
    jobevents.announce(job_id, "completed")
    telemetry.job_finished(job, "completed")
    telemetry.credits("debited", job.provider, debited)
    telemetry.credits("released", job.provider, released)
    log.info("job completed: charged %s of %s held", debited, job.estimated_cost)
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
            .returning(*jobs.c)  # the row as it ends, for the metrics and the logs
        ).first()
        refunded = ledger.void(conn, job_id, reason=code)
        if changed is not None:
            logcontext.bind_job(changed)
            usage.record_finished(conn, changed, status=status, finished_at=now,
                                  error_code=code)
            jobevents.record(conn, changed, status)
    if changed is not None:
        jobevents.announce(job_id, status)
        log.info("job %s: %s", status, code)
        telemetry.job_finished(changed, status, code)
    telemetry.credits("refunded", "" if changed is None else changed.provider, refunded)
    return changed is not None


def fail_for_credits(engine, job_id, exc: PipelineError) -> bool:
    """The hold could not be taken (wallet or budget): fail with that error's code."""
    return fail(engine, job_id, code=exc.code, message=exc.message)
