"""The two-phase credit ledger: deposit, hold, post (debit + release) or void (refund).

Every function takes a Connection inside a transaction the caller owns, and every
money move writes one append-only `transactions` row under a deterministic
idempotency key (`reserve:<job>`, `debit:<job>`, ...). The unique constraint on that
key, plus compare-and-set updates on the hold, make a replayed step a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import select, text, update

from pipeline.config import credits
from pipeline.db import insert_ignore, new_id, utcnow
from pipeline.errors import InsufficientCredits, LedgerConflict, NotFound, ValidationFailed
from pipeline.tables import credit_holds, transactions, wallets

ZERO = Decimal("0.000000")
# The most a wallet's available + held + used may add up to: what both backends hold,
# the smaller being SQLite's micro-credits in a signed 64-bit integer (NUMERIC(20, 6) on
# PostgreSQL goes to 10^14).
MAX_BALANCE = Decimal("9223372036854.775807")
# The most one deposit, refund or budget cap may be: far above any real use.
MAX_AMOUNT = Decimal("1000000000000")


@dataclass(frozen=True)
class Hold:
    id: object
    wallet_id: object
    job_id: object
    amount: Decimal
    status: str


def wallet_for_company(conn, company_id):
    row = conn.execute(select(wallets).where(wallets.c.company_id == company_id)).first()
    if row is None:
        raise NotFound("WALLET_NOT_FOUND", "This company has no wallet.")
    return row


def _record(conn, *, wallet_id, type_, amount, key, job_id=None, metadata=None) -> bool:
    """Write one ledger row; False if this key was already written (a replay).

    A replay with a different amount or type is a conflict, never a second charge.
    """
    written = insert_ignore(
        conn,
        transactions,
        {
            "id": new_id(),
            "wallet_id": wallet_id,
            "job_id": job_id,
            "type": type_,
            "amount": amount,
            "idempotency_key": key,
            "metadata": metadata or {},
        },
        ["idempotency_key"],
    )
    if not written:
        existing = conn.execute(
            select(transactions.c.amount, transactions.c.type).where(
                transactions.c.idempotency_key == key
            )
        ).one()
        if existing.amount != amount or existing.type != type_:
            raise LedgerConflict(key, f"{existing.type} {existing.amount}", f"{type_} {amount}")
    return written


def _record_new(conn, **entry) -> None:
    """Write an entry that closing a hold must be the first to write.

    The hold's compare-and-set already made this the only closing of it, so an entry
    already under the key means the ledger disagrees with itself: refuse (the caller's
    transaction rolls back) rather than move the balances a second time.
    """
    if not _record(conn, **entry):
        raise LedgerConflict(entry["key"], "an existing entry", "a hold's closing entry")


def _move(conn, wallet_id, **deltas) -> bool:
    """Apply balance deltas in one UPDATE; refuses (False) to take available below zero."""
    values = {name: getattr(wallets.c, name) + delta for name, delta in deltas.items()}
    values["updated_at"] = utcnow()
    stmt = update(wallets).where(wallets.c.id == wallet_id).values(**values)
    if deltas.get("credits_available", ZERO) < 0:
        stmt = stmt.where(wallets.c.credits_available >= -deltas["credits_available"])
    return conn.execute(stmt).rowcount == 1


def deposit(conn, wallet_id, amount, *, key: str, metadata: dict | None = None) -> bool:
    """Add credits; the key makes an operator's or a payment hook's retry harmless."""
    amount = credits(amount)
    if amount <= 0:
        raise ValueError("a deposit must be positive")
    if amount > MAX_AMOUNT:
        raise ValidationFailed(f"A deposit may be at most {MAX_AMOUNT} credits.",
                               details={"field": "amount", "max": str(MAX_AMOUNT)})
    if _record(conn, wallet_id=wallet_id, type_="deposit", amount=amount, key=key,
               metadata=metadata):
        wallet = conn.execute(select(wallets).where(wallets.c.id == wallet_id)).one()
        total = wallet.credits_available + wallet.credits_held + wallet.credits_used
        if total + amount > MAX_BALANCE:
            raise ValidationFailed(  # the caller's transaction rolls the entry back
                "This deposit would take the wallet past the most it can hold.",
                details={"field": "amount", "max": str(MAX_BALANCE - total)})
        _move(conn, wallet_id, credits_available=amount)
        return True
    return False


def get_hold(conn, job_id) -> Hold | None:
    row = conn.execute(select(credit_holds).where(credit_holds.c.job_id == job_id)).first()
    if row is None:
        return None
    return Hold(row.id, row.wallet_id, row.job_id, row.amount, row.status)


def reserve(conn, *, wallet_id, job_id, amount, ttl_seconds: int) -> Hold:
    """Hold `amount` for the job, or raise InsufficientCredits. At most one hold per job.

    The balance check and the decrement are one conditional UPDATE, so concurrent
    reservations can never take the wallet below zero between a check and a write.
    """
    amount = credits(amount)
    if conn.dialect.name == "postgresql":
        return _reserve_in_one(conn, wallet_id=wallet_id, job_id=job_id, amount=amount,
                               ttl_seconds=ttl_seconds)
    hold_id = new_id()
    # The hold row goes first: its unique job_id is the guard that makes a second
    # delivery of the reserve step find the first hold instead of holding twice.
    if not insert_ignore(
        conn,
        credit_holds,
        {
            "id": hold_id,
            "wallet_id": wallet_id,
            "job_id": job_id,
            "amount": amount,
            "expires_at": utcnow() + timedelta(seconds=ttl_seconds),
        },
        ["job_id"],
    ):
        return get_hold(conn, job_id)
    if not _move(conn, wallet_id, credits_available=-amount, credits_held=amount):
        # The caller's transaction rolls back, taking the hold row with it.
        raise InsufficientCredits(amount)
    if amount > 0:
        _record(conn, wallet_id=wallet_id, type_="reservation", amount=amount,
                key=f"reserve:{job_id}", job_id=job_id)
    return Hold(hold_id, wallet_id, job_id, amount, "open")


# The three writes of reserve() in one statement, in the same order and with the same
# guards: the hold row (its unique job_id turns a replay into no row), the wallet's
# conditional UPDATE (only when the hold is new), the reservation entry (only when the
# wallet moved). One round trip instead of three, and the wallet row's lock, taken by
# the UPDATE, is held only from here to the caller's commit.
_RESERVE = text("""
    WITH hold AS (
        INSERT INTO credit_holds (id, wallet_id, job_id, amount, expires_at)
        VALUES (:hold_id, :wallet_id, :job_id, :amount, :expires_at)
        ON CONFLICT (job_id) DO NOTHING
        RETURNING id),
    moved AS (
        UPDATE wallets
        SET credits_available = credits_available - :amount,
            credits_held = credits_held + :amount, updated_at = :now
        WHERE id = :wallet_id AND credits_available >= :amount AND EXISTS (SELECT FROM hold)
        RETURNING id),
    entry AS (
        INSERT INTO transactions (id, wallet_id, job_id, type, amount, idempotency_key)
        SELECT CAST(:entry_id AS uuid), CAST(:wallet_id AS uuid), CAST(:job_id AS uuid),
               'reservation', CAST(:amount AS numeric), CAST(:key AS text) FROM moved
        WHERE CAST(:amount AS numeric) > 0
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id)
    SELECT EXISTS (SELECT FROM hold) AS held, EXISTS (SELECT FROM moved) AS moved,
           EXISTS (SELECT FROM entry) AS recorded""")


def _reserve_in_one(conn, *, wallet_id, job_id, amount: Decimal, ttl_seconds: int) -> Hold:
    hold_id, key, now = new_id(), f"reserve:{job_id}", utcnow()
    row = conn.execute(_RESERVE, {
        "hold_id": hold_id, "wallet_id": wallet_id, "job_id": job_id, "amount": amount,
        "expires_at": now + timedelta(seconds=ttl_seconds), "now": now,
        "entry_id": new_id(), "key": key}).one()
    if not row.held:
        return get_hold(conn, job_id)  # a replay: the first delivery's hold
    if not row.moved:
        # The caller's transaction rolls back, taking the hold row with it.
        raise InsufficientCredits(amount)
    if amount > 0 and not row.recorded:
        _same_entry(conn, key, "reservation", amount)
    return Hold(hold_id, wallet_id, job_id, amount, "open")


def _same_entry(conn, key: str, type_: str, amount: Decimal) -> None:
    """An entry already under `key` must be this one, or the ledger disagrees with itself."""
    existing = conn.execute(
        select(transactions.c.amount, transactions.c.type)
        .where(transactions.c.idempotency_key == key)
    ).one()
    if existing.amount != amount or existing.type != type_:
        raise LedgerConflict(key, f"{existing.type} {existing.amount}", f"{type_} {amount}")


def _close(conn, hold: Hold, status: str) -> bool:
    """Compare-and-set the hold from open to its final state; False if already closed."""
    return (
        conn.execute(
            update(credit_holds)
            .where(credit_holds.c.id == hold.id, credit_holds.c.status == "open")
            .values(status=status, closed_at=utcnow())
        ).rowcount
        == 1
    )


def settle(conn, job_id, actual) -> Decimal | None:
    """Post the hold: debit the actual cost (capped at the hold), release the rest.

    Returns the amount debited, or None when the hold was already closed (a replay).
    """
    if conn.dialect.name == "postgresql":
        return settled(conn.execute(_SETTLE, settle_params(job_id, actual)).first(), job_id)
    actual = _actual_cost(actual)
    hold = get_hold(conn, job_id)
    if hold is None or not _close(conn, hold, "settled"):
        return None
    debit = min(actual, hold.amount)
    release = hold.amount - debit
    if debit > 0:
        _record_new(conn, wallet_id=hold.wallet_id, type_="debit", amount=debit,
                    key=f"debit:{job_id}", job_id=job_id)
    if release > 0:
        _record_new(conn, wallet_id=hold.wallet_id, type_="release", amount=release,
                    key=f"release:{job_id}", job_id=job_id)
    _move(conn, hold.wallet_id, credits_held=-hold.amount, credits_used=debit,
          credits_available=release)
    return debit


# settle()'s writes as CTEs (hold, split, entries, moved): close the open hold (the
# compare-and-set that makes this the only closing), write the debit and the release that
# are above zero, move the wallet. `gate` is a further condition on closing the hold:
# lifecycle's settle runs these CTEs in the statement that completes the job, and closes
# the hold only if that completion happened. Parameters: job_id, actual, now, debit_key,
# release_key.
def settle_ctes(gate: str = "TRUE") -> str:
    return f"""
    hold AS (
        UPDATE credit_holds SET status = 'settled', closed_at = :now
        WHERE job_id = CAST(:job_id AS uuid) AND status = 'open' AND {gate}
        RETURNING wallet_id, amount),
    split AS (
        SELECT wallet_id, amount, LEAST(CAST(:actual AS numeric), amount) AS debit FROM hold),
    entries AS (
        INSERT INTO transactions (id, wallet_id, job_id, type, amount, idempotency_key)
        SELECT gen_random_uuid(), split.wallet_id, CAST(:job_id AS uuid), e.type, e.amount,
               e.key
        FROM split, LATERAL (VALUES ('debit', split.debit, CAST(:debit_key AS text)),
                                    ('release', split.amount - split.debit,
                                     CAST(:release_key AS text)))
             AS e (type, amount, key)
        WHERE e.amount > 0
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id),
    moved AS (
        UPDATE wallets
        SET credits_held = credits_held - split.amount,
            credits_used = credits_used + split.debit,
            credits_available = credits_available + (split.amount - split.debit),
            updated_at = :now
        FROM split WHERE wallets.id = split.wallet_id
        RETURNING wallets.id)"""


# What the CTEs did, for settled(): the hold's amount and the debit (NULL with no open
# hold), the entries written and the wallets moved.
SETTLE_COLUMNS = """split.amount, split.debit, (SELECT count(*) FROM entries) AS written,
           (SELECT count(*) FROM moved) AS moved"""

_SETTLE = text(f"WITH {settle_ctes()}\n    SELECT {SETTLE_COLUMNS} FROM split")


def _actual_cost(actual) -> Decimal:
    actual = credits(actual)
    if actual < 0:
        raise ValueError(f"an actual cost cannot be negative: {actual}")
    return actual


def settle_params(job_id, actual, now=None) -> dict:
    return {"job_id": job_id, "actual": _actual_cost(actual), "now": now or utcnow(),
            "debit_key": f"debit:{job_id}", "release_key": f"release:{job_id}"}


def settled(row, job_id) -> Decimal | None:
    """The debit the settle CTEs made, None when they found no open hold. An entry
    already under either key means the ledger disagrees with itself: LedgerConflict, and
    the caller's transaction rolls back."""
    if row is None or row.amount is None:
        return None  # no open hold: a replay, or voided
    debit = credits(row.debit)
    expected = (debit > 0) + (row.amount - debit > 0)
    if row.written != expected or row.moved != 1:
        raise LedgerConflict(f"debit:{job_id}" if debit > 0 else f"release:{job_id}",
                             "an existing entry", "a hold's closing entry")
    return debit


def void(conn, job_id, *, reason: str) -> Decimal | None:
    """Refund the whole hold (failed, cancelled or expired job); None if nothing was open."""
    hold = get_hold(conn, job_id)
    if hold is None or not _close(conn, hold, "voided"):
        return None
    if hold.amount > 0:
        _record_new(conn, wallet_id=hold.wallet_id, type_="refund", amount=hold.amount,
                    key=f"refund:{job_id}", job_id=job_id, metadata={"reason": reason})
    _move(conn, hold.wallet_id, credits_held=-hold.amount, credits_available=hold.amount)
    return hold.amount


def charge_late(conn, company_id, job_id, amount) -> Decimal:
    """Charge a result that arrived after its hold was voided, straight from available.

    Charges what the wallet allows (never below zero) and records the shortfall on the
    entry. The debit carries `late: true` so the audit knows it did not come from a hold.
    """
    existing = conn.execute(
        select(transactions.c.amount).where(transactions.c.idempotency_key == f"debit:{job_id}")
    ).scalar()
    if existing is not None:
        return existing  # a replay: the charge was decided the first time
    hold = get_hold(conn, job_id)
    if hold is not None and hold.status == "open":
        raise LedgerConflict(f"debit:{job_id}", "an open hold", "a late charge")
    wallet = wallet_for_company(conn, company_id)
    amount = credits(amount)
    if amount < 0:
        raise ValueError(f"a charge cannot be negative: {amount}")
    charge = min(amount, wallet.credits_available)
    if charge <= 0:
        return ZERO
    shortfall = amount - charge
    if _record(conn, wallet_id=wallet.id, type_="debit", amount=charge, key=f"debit:{job_id}",
               job_id=job_id, metadata={"late": True, "shortfall": str(shortfall)}) and not _move(
        conn, wallet.id, credits_available=-charge, credits_used=charge
    ):
        raise InsufficientCredits(charge)
    return charge


def refund_debit(conn, job_id, amount, *, reference: str, reason: str) -> bool:
    """An operator returns (part of) a job's posted charge; False for a replayed reference.

    The wallet row is locked first so two refunds of one job cannot together return
    more than was charged. The entry carries `kind: operator` so the audit can tell it
    from the refund of a hold.
    """
    amount = credits(amount)
    if amount <= 0:
        raise ValidationFailed("amount must be positive.", details={"field": "amount"})
    debit = conn.execute(
        select(transactions.c.wallet_id, transactions.c.amount)
        .where(transactions.c.idempotency_key == f"debit:{job_id}")
    ).first()
    if debit is None:
        raise NotFound("NOTHING_TO_REFUND", "This job has no charge to refund.",
                       details={"jobId": str(job_id)})
    conn.execute(select(wallets.c.id).where(wallets.c.id == debit.wallet_id).with_for_update())
    key = f"operator-refund:{job_id}:{reference}"
    refunded = sum(
        conn.execute(
            select(transactions.c.amount).where(
                transactions.c.job_id == job_id, transactions.c.type == "refund",
                transactions.c.idempotency_key.like("operator-refund:%"),
                transactions.c.idempotency_key != key)
        ).scalars(),
        ZERO,
    )
    if amount > debit.amount - refunded:
        raise ValidationFailed(
            "The refund is more than what is left of the charge.",
            details={"field": "amount", "charged": str(debit.amount),
                     "alreadyRefunded": str(refunded)},
        )
    if not _record(conn, wallet_id=debit.wallet_id, type_="refund", amount=amount, key=key,
                   job_id=job_id, metadata={"kind": "operator", "reason": reason}):
        return False
    _move(conn, debit.wallet_id, credits_available=amount, credits_used=-amount)
    return True
