"""Reading a company's wallet and its ledger entries."""

from __future__ import annotations

from sqlalchemy import func, select

from pipeline import budgets, ledger
from pipeline.tables import credit_holds, transactions


def wallet_summary(conn, company_id) -> dict:
    wallet = ledger.wallet_for_company(conn, company_id)
    open_holds = conn.execute(
        select(func.count()).select_from(credit_holds)
        .where(credit_holds.c.wallet_id == wallet.id, credit_holds.c.status == "open")
    ).scalar_one()
    return {
        "walletId": str(wallet.id),
        "available": str(wallet.credits_available),
        "held": str(wallet.credits_held),
        "used": str(wallet.credits_used),
        "openHolds": open_holds,
        "budgets": budgets.summaries(conn, company_id),
    }


def list_transactions(conn, company_id, *, limit: int = 50, before=None,
                      type_: str | None = None) -> list[dict]:
    """Newest first; `before` is the id of the last entry of the previous page."""
    wallet = ledger.wallet_for_company(conn, company_id)
    stmt = select(transactions).where(transactions.c.wallet_id == wallet.id)
    if type_:
        stmt = stmt.where(transactions.c.type == type_)
    if before is not None:
        anchor = conn.execute(
            select(transactions.c.created_at, transactions.c.id)
            .where(transactions.c.id == before, transactions.c.wallet_id == wallet.id)
        ).first()
        if anchor is not None:
            stmt = stmt.where(
                (transactions.c.created_at < anchor.created_at)
                | ((transactions.c.created_at == anchor.created_at)
                   & (transactions.c.id < anchor.id))
            )
    rows = conn.execute(
        stmt.order_by(transactions.c.created_at.desc(), transactions.c.id.desc()).limit(limit)
    ).all()
    return [
        {
            "id": str(r.id),
            "type": r.type,
            "amount": str(r.amount),
            "jobId": str(r.job_id) if r.job_id else None,
            "key": r.idempotency_key,
            "metadata": r.metadata,
            "createdAt": r.created_at.isoformat(),
        }
        for r in rows
    ]


def deposit(engine, company_id, amount, *, reference: str, reason: str = "") -> dict:
    """An operator's deposit; the reference makes a retried request harmless."""
    with engine.begin() as conn:
        wallet = ledger.wallet_for_company(conn, company_id)
        created = ledger.deposit(conn, wallet.id, amount, key=f"deposit:{company_id}:{reference}",
                                 metadata={"reason": reason, "reference": reference})
        summary = wallet_summary(conn, company_id)
    return {"created": created, "wallet": summary}


def refund(engine, company_id, job_id, amount, *, reference: str, reason: str = "") -> dict:
    """An operator returns part or all of a completed job's charge (scoped to the company)."""
    from pipeline.jobs import get_job

    with engine.begin() as conn:
        job = get_job(conn, job_id, company_id)
        if amount is None:
            amount = job.actual_cost or 0
        created = ledger.refund_debit(conn, job.id, amount, reference=reference, reason=reason)
        summary = wallet_summary(conn, company_id)
    return {"created": created, "wallet": summary}
