"""The ledger audit on PostgreSQL and SQLite: silent on a sound ledger, precise on a broken one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import delete, select, update

from pipeline import ledger, lifecycle
from pipeline.audit import CHECKS, Finding, audit, summary
from pipeline.config import Settings
from pipeline.db import init_db, new_id, utcnow
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.provider import Output
from pipeline.tables import credit_holds, jobs, transactions, wallets
from service.runtime import build_runtime
from tests.builders import make_company

TTL = 3600


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def runtime(request, tmp_path):
    """A Runtime on a database of its own: the audit scans everything in it."""
    if request.param == "postgresql":
        url = request.getfixturevalue("empty_pg_database")
    else:
        url = f"sqlite:///{tmp_path}/ledger.db"
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"), "DATABASE_URL": url, "SECRET_KEY": "k",
        "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env")})
    rt = build_runtime(settings)
    init_db(rt.engine)
    yield rt
    rt.engine.dispose()


@dataclass(frozen=True)
class Ledger:
    """A ledger after real use, with a job in each state the audit must accept."""

    company: object
    completed: object  # reserved, generated, settled below its hold (debit + release)
    free: object  # completed with zero usage: the whole hold released, no debit
    late: object  # hold voided before the result came, then charged late
    failed: object  # reserved, then failed: hold refunded
    open: object  # reserved, still running
    unreserved_failure: object  # failed before any hold was taken


def _submit(rt, company):
    principal = Principal(company.company_id, company.user_id, None)
    return submit_job(rt.engine, rt.registry, principal=principal,
                      req=JobRequest("text", "hello world", {"maxTokens": 100}),
                      max_prompt_length=4000)["id"]


def _generate(rt, job_id, tokens: int) -> None:
    lifecycle.claim_generation(rt.engine, job_id, stale_after=400)
    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
    lifecycle.save_output(rt.engine, rt.storage, job,
                          Output(b"done", "text/plain", "txt", {"tokens": tokens}))
    lifecycle.store(rt.engine, rt.storage, job_id)


def _ledger_in_use(rt) -> Ledger:
    company = make_company(rt.engine, credits=10)
    ids = {name: _submit(rt, company) for name in Ledger.__dataclass_fields__ if name != "company"}
    for name in ("completed", "free", "late", "failed", "open"):
        assert lifecycle.reserve(rt.engine, ids[name], ttl_seconds=TTL)
    _generate(rt, ids["completed"], tokens=10)
    assert lifecycle.settle(rt.engine, ids["completed"])
    _generate(rt, ids["free"], tokens=0)
    assert lifecycle.settle(rt.engine, ids["free"])
    _generate(rt, ids["late"], tokens=10)
    with rt.engine.begin() as conn:
        ledger.void(conn, ids["late"], reason="HOLD_EXPIRED")
    assert lifecycle.settle(rt.engine, ids["late"])  # takes the charge_late path
    assert lifecycle.fail(rt.engine, ids["failed"], code="PROVIDER_ERROR", message="boom")
    assert lifecycle.fail(rt.engine, ids["unreserved_failure"], code="X", message="early")
    return Ledger(company=company, **ids)


def _pairs(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.check, f.subject) for f in findings}


def _entries(conn, job_id) -> dict:
    rows = conn.execute(select(transactions).where(transactions.c.job_id == job_id)).all()
    return {row.type: row for row in rows}


def _add_entry(conn, wallet_id, job_id, type_, amount, *, key, metadata=None) -> None:
    conn.execute(transactions.insert().values(
        id=new_id(), wallet_id=wallet_id, job_id=job_id, type=type_, amount=amount,
        idempotency_key=key, metadata=metadata or {}))


def test_a_ledger_in_real_use_has_no_findings(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.connect() as conn:
        late = _entries(conn, state.late)
        completed = _entries(conn, state.completed)
    # The scenario covers what it claims: a late debit after a refund, and a release.
    assert late["debit"].metadata["late"] is True
    assert {"refund", "reservation"} <= set(late)
    assert {"reservation", "debit", "release"} == set(completed)

    findings = audit(runtime.engine)

    assert findings == []
    assert summary(findings) == dict.fromkeys(CHECKS, 0)


def test_a_negative_balance_is_found(runtime):
    _ledger_in_use(runtime)
    broke = make_company(runtime.engine, credits=0, name="broke")
    engine = runtime.engine
    with engine.begin() as conn:
        # Only a bypassed constraint lets a balance go negative; keep the wallet equal to
        # its entries so that this is the one broken invariant.
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "ALTER TABLE wallets DROP CONSTRAINT ck_wallets_available_nonneg")
        else:
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        _add_entry(conn, broke.wallet_id, None, "debit", Decimal(1), key="overdraft",
                   metadata={"late": True})
        conn.execute(update(wallets).where(wallets.c.id == broke.wallet_id)
                     .values(credits_available=Decimal(-1), credits_used=Decimal(1)))
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")

    findings = audit(engine)

    assert _pairs(findings) == {("negative_balance", str(broke.wallet_id))}
    assert "available -1.000000" in findings[0].message


def test_a_wallet_that_differs_from_its_transactions_is_found(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        conn.execute(update(wallets).where(wallets.c.id == state.company.wallet_id)
                     .values(credits_available=wallets.c.credits_available + Decimal(1)))

    findings = audit(runtime.engine)

    assert _pairs(findings) == {("balance_mismatch", str(state.company.wallet_id))}
    assert summary(findings)["balance_mismatch"] == 1


def test_a_second_reservation_for_one_job_is_found(runtime):
    state = _ledger_in_use(runtime)
    wallet_id = state.company.wallet_id
    with runtime.engine.begin() as conn:
        amount = _entries(conn, state.open)["reservation"].amount
        _add_entry(conn, wallet_id, state.open, "reservation", amount,
                   key=f"reserve-again:{state.open}")
        conn.execute(update(wallets).where(wallets.c.id == wallet_id).values(
            credits_available=wallets.c.credits_available - amount,
            credits_held=wallets.c.credits_held + amount))

    findings = audit(runtime.engine)

    # The wallet still adds up; the job now holds twice what its hold row says.
    assert _pairs(findings) == {("duplicate_reservation", str(state.open)),
                                ("unbalanced_hold", str(state.open))}


def test_a_second_hold_for_one_job_is_found(runtime):
    if runtime.engine.dialect.name == "sqlite":
        pytest.skip("SQLite cannot drop the unique constraint that forbids this")
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE credit_holds DROP CONSTRAINT uq_credit_holds_job")
        hold = conn.execute(select(credit_holds).where(credit_holds.c.job_id == state.open)).one()
        conn.execute(credit_holds.insert().values(
            id=new_id(), wallet_id=hold.wallet_id, job_id=hold.job_id, amount=hold.amount,
            expires_at=hold.expires_at))

    assert _pairs(audit(runtime.engine)) == {("duplicate_hold", str(state.open))}


def test_an_open_hold_on_a_failed_job_is_found(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == state.open).values(status="failed"))

    assert _pairs(audit(runtime.engine)) == {("open_hold_on_terminal_job", str(state.open))}


def test_a_settled_hold_that_does_not_add_up_is_found(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        conn.execute(update(credit_holds).where(credit_holds.c.job_id == state.completed)
                     .values(amount=credit_holds.c.amount + Decimal(1)))

    findings = audit(runtime.engine)

    assert _pairs(findings) == {("unbalanced_hold", str(state.completed))}
    assert findings[0].message.startswith("settled hold of")


def test_hold_entries_without_a_hold_are_found(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        conn.execute(delete(credit_holds).where(credit_holds.c.job_id == state.failed))

    findings = audit(runtime.engine)

    assert _pairs(findings) == {("unbalanced_hold", str(state.failed))}
    assert findings[0].message.startswith("no hold")


def test_a_job_both_debited_and_refunded_is_found(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        # Relabel the release as a refund: the wallet's sums stay the same.
        conn.execute(update(transactions).where(transactions.c.job_id == state.completed,
                                                transactions.c.type == "release")
                     .values(type="refund"))

    findings = audit(runtime.engine)

    assert _pairs(findings) == {("debit_and_refund", str(state.completed)),
                                ("unbalanced_hold", str(state.completed))}


def test_a_job_debited_twice_is_found(runtime):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        # Split the debit in two: the wallet and the job's actual cost still add up.
        debit = _entries(conn, state.completed)["debit"]
        half = (debit.amount / 2).quantize(Decimal("0.000001"))
        conn.execute(update(transactions).where(transactions.c.id == debit.id)
                     .values(amount=half))
        _add_entry(conn, state.company.wallet_id, state.completed, "debit", debit.amount - half,
                   key=f"debit-again:{state.completed}")

    assert _pairs(audit(runtime.engine)) == {("double_debit", str(state.completed))}


def test_a_hold_past_its_expiry_is_found(runtime):
    state = _ledger_in_use(runtime)
    later = utcnow() + timedelta(seconds=TTL + 60)

    assert _pairs(audit(runtime.engine, now=later)) == {("expired_hold", str(state.open))}
    assert audit(runtime.engine, now=later.replace(tzinfo=None)) != []  # naive means UTC

    with runtime.engine.begin() as conn:
        conn.execute(update(credit_holds).where(credit_holds.c.job_id == state.open)
                     .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert _pairs(audit(runtime.engine)) == {("expired_hold", str(state.open))}


@pytest.mark.parametrize("actual_cost", [Decimal("123"), None])
def test_a_completed_job_whose_actual_cost_is_not_its_debit_is_found(runtime, actual_cost):
    state = _ledger_in_use(runtime)
    with runtime.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == state.late)
                     .values(actual_cost=actual_cost))

    findings = audit(runtime.engine)

    assert _pairs(findings) == {("actual_cost_mismatch", str(state.late))}


def test_summary_counts_findings_per_check():
    findings = [Finding("expired_hold", "a", ""), Finding("expired_hold", "b", ""),
                Finding("balance_mismatch", "w", "")]

    counts = summary(findings)

    assert counts["expired_hold"] == 2
    assert counts["balance_mismatch"] == 1
    assert sum(counts.values()) == 3
    assert list(counts) == list(CHECKS)
