"""The ledger audit: checks the credit invariants of DESIGN.md against the database."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC
from functools import cache

from sqlalchemy import DateTime, and_, bindparam, case, false, func, not_, or_, select

from pipeline.db import utcnow
from pipeline.tables import TERMINAL_STATUSES, credit_holds, jobs, transactions, wallets

CHECKS = (
    "negative_balance",  # invariant 1
    "balance_mismatch",  # invariant 2
    "duplicate_reservation",  # invariant 3
    "duplicate_hold",  # invariant 3
    "open_hold_on_terminal_job",  # invariant 3: a terminal job's hold is closed
    "unbalanced_hold",  # invariant 3: the closure (or the opening) balances exactly
    "debit_and_refund",  # invariant 3: a hold is posted or voided, never both
    "double_debit",  # invariant 3
    "expired_hold",  # invariant 4
    "actual_cost_mismatch",  # what the client is shown equals what was charged
)


@dataclass(frozen=True)
class Finding:
    """One broken invariant: which check, on which wallet or job, and what was seen."""

    check: str
    subject: str  # the wallet id or job id, as a string
    message: str


# A late debit (ledger.charge_late) is taken straight from available after its hold
# was voided; every other debit spends a hold. The two move different balances.
_late = func.coalesce(transactions.c.metadata["late"].as_boolean(), false())


# An operator's refund of a posted charge (ledger.refund_debit) returns credits from
# `used` to `available`; every other refund returns a hold.
_operator = transactions.c.idempotency_key.like("operator-refund:%")


def _sum(type_: str, *, late: bool | None = None, operator: bool | None = None):
    condition = transactions.c.type == type_
    if late is not None:
        condition = and_(condition, _late if late else not_(_late))
    if operator is not None:
        condition = and_(condition, _operator if operator else not_(_operator))
    return func.coalesce(func.sum(case((condition, transactions.c.amount), else_=0)), 0)


def _count(condition):
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _entry_sums(group_column):
    """One row per wallet or job: the sum of each kind of entry, and a few counts."""
    is_debit = transactions.c.type == "debit"
    return (
        select(
            group_column.label("owner"),
            _sum("deposit").label("deposit"),
            _sum("reservation").label("reservation"),
            _sum("debit", late=False).label("debit"),
            _sum("debit", late=True).label("late_debit"),
            _sum("release").label("release"),
            _sum("refund", operator=False).label("refund"),
            _sum("refund", operator=True).label("operator_refund"),
            _count(transactions.c.type == "reservation").label("reservations"),
            _count(is_debit).label("debits"),
            _count(and_(is_debit, not_(_late))).label("hold_debits"),
            _count(and_(transactions.c.type == "refund", not_(_operator))).label("refunds"),
        )
        .where(group_column.is_not(None))
        .group_by(group_column)
        .subquery()
    )


def audit(engine, *, now=None) -> list[Finding]:
    """Every broken ledger invariant in the database, as findings (empty when sound)."""
    now = now or utcnow()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    findings: list[Finding] = []
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        # One snapshot for every query: a job settled between two queries would
        # otherwise look half-done to the later one and be reported falsely.
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    with conn:
        for check in (_negative_balances, _balance_mismatches, _duplicates, _hold_closures,
                      _job_entries, _expired_holds, _actual_costs):
            findings.extend(check(conn, now))
    order = {name: i for i, name in enumerate(CHECKS)}
    return sorted(findings, key=lambda f: (order[f.check], f.subject))


def summary(findings) -> dict[str, int]:
    """Findings per check, every check listed (a zero is a check that passed)."""
    counts = Counter(f.check for f in findings)
    return {check: counts.get(check, 0) for check in CHECKS}


# Each check's statement is built once and cached (the @cache functions below): building
# SQLAlchemy expressions costs more than running them on a small ledger, and the property
# tests audit after every step.


@cache
def _job_sums():
    return _entry_sums(transactions.c.job_id)


@cache
def _negative_balances_query():
    w = wallets.c
    return (select(w.id, w.credits_available, w.credits_held, w.credits_used)
            .where(or_(w.credits_available < 0, w.credits_held < 0, w.credits_used < 0)))


def _negative_balances(conn, _now):
    for r in conn.execute(_negative_balances_query()):
        yield Finding("negative_balance", str(r.id),
                      f"available {r.credits_available}, held {r.credits_held}, "
                      f"used {r.credits_used}: none may be below zero")


@cache
def _balance_query():
    s = _entry_sums(transactions.c.wallet_id)
    # A wallet without entries joins to NULL sums, which must read as zero.
    dep, res, debit, late, rel, ref, op = (
        func.coalesce(c, 0) for c in (s.c.deposit, s.c.reservation, s.c.debit, s.c.late_debit,
                                      s.c.release, s.c.refund, s.c.operator_refund)
    )
    available = (dep - res + rel + ref - late + op).label("available")
    held = (res - debit - rel - ref).label("held")
    used = (debit + late - op).label("used")
    w = wallets.c
    return (
        select(w.id, w.credits_available, w.credits_held, w.credits_used, available, held, used)
        .select_from(wallets.outerjoin(s, s.c.owner == w.id))
        .where(or_(w.credits_available != available, w.credits_held != held,
                   w.credits_used != used))
    )


def _balance_mismatches(conn, _now):
    for r in conn.execute(_balance_query()):
        yield Finding(
            "balance_mismatch", str(r.id),
            f"wallet (available {r.credits_available}, held {r.credits_held}, used "
            f"{r.credits_used}) != its transactions (available {r.available}, held {r.held}, "
            f"used {r.used})")


@cache
def _duplicate_queries():
    s = _job_sums()
    reservations = select(s.c.owner, s.c.reservations).where(s.c.reservations > 1)
    # The unique constraint forbids this; the audit still checks the data, not the schema.
    holds = (
        select(credit_holds.c.job_id, func.count().label("n"))
        .group_by(credit_holds.c.job_id)
        .having(func.count() > 1)
    )
    return reservations, holds


def _duplicates(conn, _now):
    reservations, holds = _duplicate_queries()
    for r in conn.execute(reservations):
        yield Finding("duplicate_reservation", str(r.owner),
                      f"{r.reservations} reservations for one job")
    for r in conn.execute(holds):
        yield Finding("duplicate_hold", str(r.job_id), f"{r.n} holds for one job")


@cache
def _hold_queries():
    s = _job_sums()
    h = credit_holds.c
    res, debit, rel, ref = (func.coalesce(c, 0) for c in (s.c.reservation, s.c.debit,
                                                          s.c.release, s.c.refund))
    # A zero hold writes no reservation row; any other hold writes exactly its amount.
    opened_wrong = res != h.amount
    closed_wrong = or_(
        and_(h.status == "settled", or_(debit + rel != h.amount, ref != 0)),
        and_(h.status == "voided", or_(ref != h.amount, debit != 0, rel != 0)),
        and_(h.status == "open", debit + rel + ref != 0),
    )
    terminal_open = and_(h.status == "open", jobs.c.status.in_(TERMINAL_STATUSES))
    holds = (
        select(h.job_id, h.amount, h.status, jobs.c.status.label("job_status"),
               res.label("reservation"), debit.label("debit"), rel.label("release"),
               ref.label("refund"), terminal_open.label("terminal_open"),
               or_(opened_wrong, closed_wrong).label("unbalanced"))
        .select_from(credit_holds.join(jobs, jobs.c.id == h.job_id)
                     .outerjoin(s, s.c.owner == h.job_id))
        .where(or_(terminal_open, opened_wrong, closed_wrong))
    )
    # Hold entries with no hold at all; a late debit alone is fine (the job was
    # settled after its hold was gone, lifecycle.settle -> ledger.charge_late).
    orphans = (
        select(s.c.owner, s.c.reservation, s.c.debit, s.c.release, s.c.refund)
        .select_from(s.outerjoin(credit_holds, h.job_id == s.c.owner))
        .where(h.id.is_(None), s.c.reservation + s.c.debit + s.c.release + s.c.refund != 0)
    )
    return holds, orphans


def _hold_closures(conn, _now):
    holds, orphans = _hold_queries()
    for r in conn.execute(holds):
        if r.terminal_open:
            yield Finding("open_hold_on_terminal_job", str(r.job_id),
                          f"{r.job_status} job still holds {r.amount}")
        if r.unbalanced:
            yield Finding(
                "unbalanced_hold", str(r.job_id),
                f"{r.status} hold of {r.amount}: reservation {r.reservation}, debit "
                f"{r.debit}, release {r.release}, refund {r.refund}")
    for r in conn.execute(orphans):
        yield Finding("unbalanced_hold", str(r.owner),
                      f"no hold, yet reservation {r.reservation}, debit {r.debit}, "
                      f"release {r.release}, refund {r.refund}")


@cache
def _job_entries_query():
    s = _job_sums()
    return (select(s.c.owner, s.c.hold_debits, s.c.debits, s.c.refunds)
            .where(or_(and_(s.c.hold_debits > 0, s.c.refunds > 0), s.c.debits > 1)))


def _job_entries(conn, _now):
    for r in conn.execute(_job_entries_query()):
        if r.hold_debits and r.refunds:
            yield Finding("debit_and_refund", str(r.owner),
                          "the hold was both posted (debit) and voided (refund)")
        if r.debits > 1:
            yield Finding("double_debit", str(r.owner), f"{r.debits} debits for one job")


@cache
def _expired_query():
    h = credit_holds.c
    return (select(h.job_id, h.amount, h.expires_at)
            .where(h.status == "open",
                   h.expires_at < bindparam("now", type_=DateTime(timezone=True))))


def _expired_holds(conn, now):
    for r in conn.execute(_expired_query(), {"now": now}):
        yield Finding("expired_hold", str(r.job_id),
                      f"hold of {r.amount} still open after it expired at {r.expires_at}")


@cache
def _actual_cost_query():
    s = _job_sums()
    charged = func.coalesce(s.c.debit, 0) + func.coalesce(s.c.late_debit, 0)
    return (
        select(jobs.c.id, jobs.c.actual_cost, charged.label("charged"))
        .select_from(jobs.outerjoin(s, s.c.owner == jobs.c.id))
        .where(jobs.c.status == "completed",
               or_(jobs.c.actual_cost.is_(None), jobs.c.actual_cost != charged))
    )


def _actual_costs(conn, _now):
    for r in conn.execute(_actual_cost_query()):
        yield Finding("actual_cost_mismatch", str(r.id),
                      f"completed with actual cost {r.actual_cost}, debited {r.charged}")
