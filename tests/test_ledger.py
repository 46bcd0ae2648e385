"""The ledger on real PostgreSQL: holds, posts, voids, replays and races."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import select

from pipeline import ledger
from pipeline.errors import InsufficientCredits, LedgerConflict
from pipeline.jobs import JobRequest, Principal, submit_job
from pipeline.tables import credit_holds, transactions
from tests.builders import assert_wallet_matches_ledger, make_company, wallet_of

pytestmark = pytest.mark.postgres


def _job(runtime, company, prompt="hello world", settings=None):
    principal = Principal(company.company_id, company.user_id, None)
    return submit_job(runtime.engine, runtime.registry, principal=principal,
                      req=JobRequest("text", prompt, settings or {"maxTokens": 100}),
                      max_prompt_length=4000)


def test_hold_then_settle_debits_actual_and_releases_the_rest(pg_runtime):
    engine = pg_runtime.engine
    company = make_company(engine, credits=10)
    job = _job(pg_runtime, company)
    with engine.begin() as conn:
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job["id"],
                       amount=Decimal("1.5"), ttl_seconds=60)
    wallet = wallet_of(engine, company.company_id)
    assert (wallet.credits_available, wallet.credits_held) == (Decimal("8.5"), Decimal("1.5"))
    with engine.begin() as conn:
        assert ledger.settle(conn, job["id"], Decimal("0.4")) == Decimal("0.4")
    wallet = wallet_of(engine, company.company_id)
    assert wallet.credits_available == Decimal("9.6")
    assert wallet.credits_held == 0
    assert wallet.credits_used == Decimal("0.4")
    assert_wallet_matches_ledger(engine, company.company_id)


def test_settle_never_charges_more_than_the_hold(pg_runtime):
    engine = pg_runtime.engine
    company = make_company(engine, credits=5)
    job = _job(pg_runtime, company)
    with engine.begin() as conn:
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job["id"], amount=1,
                       ttl_seconds=60)
        assert ledger.settle(conn, job["id"], Decimal("3")) == Decimal("1")
    assert wallet_of(engine, company.company_id).credits_used == Decimal("1")


def test_every_step_replayed_moves_money_once(pg_runtime):
    engine = pg_runtime.engine
    company = make_company(engine, credits=10)
    job = _job(pg_runtime, company)
    for _ in range(3):
        with engine.begin() as conn:
            ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job["id"], amount=2,
                           ttl_seconds=60)
    for _ in range(3):
        with engine.begin() as conn:
            ledger.settle(conn, job["id"], Decimal("1.25"))
    with engine.begin() as conn:
        assert ledger.void(conn, job["id"], reason="late cancel") is None
    with engine.connect() as conn:
        kinds = conn.execute(select(transactions.c.type)
                             .where(transactions.c.job_id == job["id"])).scalars().all()
    assert sorted(kinds) == ["debit", "release", "reservation"]
    wallet = wallet_of(engine, company.company_id)
    assert wallet.credits_available == Decimal("8.75")
    assert_wallet_matches_ledger(engine, company.company_id)


def test_void_returns_the_whole_hold_once(pg_runtime):
    engine = pg_runtime.engine
    company = make_company(engine, credits=3)
    job = _job(pg_runtime, company)
    with engine.begin() as conn:
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job["id"], amount=2,
                       ttl_seconds=60)
    with engine.begin() as conn:
        assert ledger.void(conn, job["id"], reason="failed") == Decimal(2)
    with engine.begin() as conn:
        assert ledger.void(conn, job["id"], reason="failed") is None
        assert ledger.settle(conn, job["id"], 1) is None  # a voided hold is never posted
    wallet = wallet_of(engine, company.company_id)
    assert (wallet.credits_available, wallet.credits_held) == (Decimal(3), Decimal(0))
    assert_wallet_matches_ledger(engine, company.company_id)


def test_insufficient_credits_writes_nothing(pg_runtime):
    engine = pg_runtime.engine
    company = make_company(engine, credits=1)
    job = _job(pg_runtime, company)
    with pytest.raises(InsufficientCredits), engine.begin() as conn:
        ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job["id"], amount=2,
                       ttl_seconds=60)
    with engine.connect() as conn:
        assert conn.execute(select(credit_holds).where(credit_holds.c.job_id == job["id"])
                            ).first() is None
    assert wallet_of(engine, company.company_id).credits_available == Decimal(1)


def test_replaying_a_key_with_another_amount_is_refused(pg_runtime):
    engine = pg_runtime.engine
    company = make_company(engine, credits=0)
    key = f"payment:{uuid.uuid4()}"
    with engine.begin() as conn:
        assert ledger.deposit(conn, company.wallet_id, 5, key=key)
    with engine.begin() as conn:
        assert not ledger.deposit(conn, company.wallet_id, 5, key=key)
    with pytest.raises(LedgerConflict), engine.begin() as conn:
        ledger.deposit(conn, company.wallet_id, 7, key=key)
    assert wallet_of(engine, company.company_id).credits_available == Decimal(5)


def test_concurrent_reservations_never_overdraw(pg_runtime):
    """30 threads race for a wallet that covers exactly 10 holds."""
    engine = pg_runtime.engine
    company = make_company(engine, credits=10)
    job_ids = [_job(pg_runtime, company)["id"] for _ in range(30)]
    results: list[str] = []
    barrier = threading.Barrier(len(job_ids))

    def attempt(job_id):
        barrier.wait()
        try:
            with engine.begin() as conn:
                ledger.reserve(conn, wallet_id=company.wallet_id, job_id=job_id, amount=1,
                               ttl_seconds=60)
            results.append("held")
        except InsufficientCredits:
            results.append("refused")

    threads = [threading.Thread(target=attempt, args=(j,)) for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("held") == 10
    assert results.count("refused") == 20
    wallet = wallet_of(engine, company.company_id)
    assert wallet.credits_available == 0
    assert wallet.credits_held == 10
    assert_wallet_matches_ledger(engine, company.company_id)
