"""Spending caps per calendar period (UTC) for a company, one of its users, or one API key.

A budget counts the period's posted spend (debits written since the period began)
plus every hold still open, so a burst of running jobs cannot overshoot the cap.
A hold taken in one period and settled in the next counts as open until it settles,
then as the next period's spend: the cap is never passed, and a new period starts
from what really ran in it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import and_, func, or_, select, update

from pipeline.config import credits
from pipeline.db import insert_ignore, new_id, utcnow
from pipeline.errors import PipelineError, ValidationFailed
from pipeline.ledger import MAX_AMOUNT, ZERO
from pipeline.tables import api_keys, budgets, credit_holds, jobs, transactions, users

PERIODS = ("day", "month")
_ADJECTIVE = {"day": "daily", "month": "monthly"}
SCOPES = ("company", "user", "api_key")


class BudgetExceeded(PipelineError):
    status = 402
    code = "BUDGET_EXCEEDED"

    def __init__(self, budget, spent: Decimal, held: Decimal, amount: Decimal):
        super().__init__(
            f"This job would pass the {_ADJECTIVE[budget.period]} budget of {budget.cap} credits.",
            details={"scope": budget.scope, "period": budget.period, "cap": str(budget.cap),
                     "spent": str(spent), "held": str(held), "required": str(amount)},
        )


def period_start(period: str, now: datetime | None = None) -> datetime:
    now = (now or utcnow()).astimezone(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def set_budget(engine, company_id, *, period: str, cap, scope: str = "company",
               subject: str = "") -> dict:
    """Create or change a cap; `subject` is the user's or the key's id for those scopes."""
    if period not in PERIODS:
        raise ValidationFailed(f"period must be one of {', '.join(PERIODS)}.",
                               details={"field": "period"})
    if scope not in SCOPES:
        raise ValidationFailed(f"scope must be one of {', '.join(SCOPES)}.",
                               details={"field": "scope"})
    if (scope == "company") != (not subject):
        raise ValidationFailed("subject is required for user and api_key budgets, and only "
                               "for them.", details={"field": "subject"})
    if subject:
        try:
            subject = str(uuid.UUID(str(subject)))
        except ValueError:
            raise ValidationFailed("subject must be a user id or an API key id.",
                                   details={"field": "subject"}) from None
    cap = credits(cap)
    if not ZERO <= cap <= MAX_AMOUNT:
        raise ValidationFailed(f"cap must be from 0 to {MAX_AMOUNT}.",
                               details={"field": "cap", "max": str(MAX_AMOUNT)})
    with engine.begin() as conn:
        if subject and not _belongs(conn, company_id, scope, subject):
            # Another company's user or key is reported exactly as one that does not exist.
            noun = "user" if scope == "user" else "API key"
            raise ValidationFailed(f"This company has no {noun} with id {subject}.",
                                   details={"field": "subject"})
        key = {"company_id": company_id, "scope": scope, "subject": str(subject),
               "period": period}
        if not insert_ignore(conn, budgets, {"id": new_id(), "cap": cap, **key},
                             ["company_id", "scope", "subject", "period"]):
            conn.execute(update(budgets).filter_by(**key).values(cap=cap, updated_at=utcnow()))
    return {"scope": scope, "subject": str(subject), "period": period, "cap": str(cap)}


def _belongs(conn, company_id, scope: str, subject: str) -> bool:
    table = users if scope == "user" else api_keys
    return conn.execute(select(table.c.id).where(
        table.c.id == uuid.UUID(subject), table.c.company_id == company_id)).first() is not None


def _subject_filter(budget):
    if budget.scope == "user":
        return jobs.c.user_id == uuid.UUID(budget.subject)
    if budget.scope == "api_key":
        return jobs.c.api_key_id == uuid.UUID(budget.subject)
    return jobs.c.company_id == budget.company_id


def usage(conn, budget, now: datetime | None = None) -> tuple[Decimal, Decimal]:
    """(posted spend this period, open holds) for the budget's subject.

    Both sums come from ONE statement, so they share one snapshot: read separately, a
    settle committing in between (hold closed, debit written) would be counted in
    neither, and a reservation could slip past the cap.
    """
    start = period_start(budget.period, now)
    spent = (
        select(func.coalesce(func.sum(transactions.c.amount), 0))
        .select_from(transactions.join(jobs, jobs.c.id == transactions.c.job_id))
        .where(jobs.c.company_id == budget.company_id, _subject_filter(budget),
               transactions.c.type == "debit", transactions.c.created_at >= start)
        .scalar_subquery()
    )
    held = (
        select(func.coalesce(func.sum(credit_holds.c.amount), 0))
        .select_from(credit_holds.join(jobs, jobs.c.id == credit_holds.c.job_id))
        .where(jobs.c.company_id == budget.company_id, _subject_filter(budget),
               credit_holds.c.status == "open")
        .scalar_subquery()
    )
    row = conn.execute(select(spent.label("spent"), held.label("held"))).one()
    # The sums keep the columns' Credits type, so SQLite's micro-credits come back exact.
    return credits(row.spent), credits(row.held)


def applicable(conn, company_id, user_id, api_key_id, *, lock: bool):
    """The budgets that govern a job of this caller, locked for the caller's transaction."""
    subjects = [and_(budgets.c.scope == "company")]
    if user_id is not None:
        subjects.append(and_(budgets.c.scope == "user", budgets.c.subject == str(user_id)))
    if api_key_id is not None:
        subjects.append(and_(budgets.c.scope == "api_key", budgets.c.subject == str(api_key_id)))
    stmt = (select(budgets).where(budgets.c.company_id == company_id, or_(*subjects))
            .order_by(budgets.c.id))
    if lock:
        # Serialises reservations under one budget: the sum we read stays true until commit.
        stmt = stmt.with_for_update()
    return conn.execute(stmt).all()


def check(conn, company_id, user_id, api_key_id, amount, *, lock: bool = True,
          now: datetime | None = None) -> None:
    """Raise BudgetExceeded if holding `amount` more would pass any governing cap."""
    for budget in applicable(conn, company_id, user_id, api_key_id, lock=lock):
        spent, held = usage(conn, budget, now)
        if spent + held + amount > budget.cap:
            raise BudgetExceeded(budget, spent, held, amount)


def summaries(conn, company_id, now: datetime | None = None) -> list[dict]:
    rows = conn.execute(select(budgets).where(budgets.c.company_id == company_id)
                        .order_by(budgets.c.scope, budgets.c.period)).all()
    out = []
    for budget in rows:
        spent, held = usage(conn, budget, now)
        out.append({"scope": budget.scope, "subject": budget.subject or None,
                    "period": budget.period, "cap": str(budget.cap),
                    "periodStart": period_start(budget.period, now).isoformat(),
                    "spent": str(spent), "held": str(held),
                    "remaining": str(max(budget.cap - spent - held, Decimal(0)))})
    return out
