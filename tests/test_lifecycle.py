"""The chain's use cases on PostgreSQL, driven directly: expiry, late results, replays."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select

from pipeline import lifecycle, sweeper
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.provider import GenerationRequest
from pipeline.tables import api_usage, credit_holds, transactions
from providers.local import LocalProvider
from tests.builders import assert_wallet_matches_ledger, make_company, wallet_of

pytestmark = pytest.mark.postgres

COST = Decimal("0.002")  # a 100x100 local image


def _job(rt, company):
    return submit_job(rt.engine, rt.registry,
                      principal=Principal(company.company_id, company.user_id, None),
                      req=JobRequest("image", "a square", {"width": 100, "height": 100}),
                      max_prompt_length=4000)["id"]


def _render(job_id):
    return LocalProvider().start(GenerationRequest(str(job_id), "image", "a square",
                                                   {"width": 100, "height": 100}))


def _save(rt, job_id):
    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
    lifecycle.save_output(rt.engine, rt.storage, job, _render(job_id))


def _expire(rt, job_id):
    lifecycle.reserve(rt.engine, job_id, ttl_seconds=-1)  # a hold that is already past due
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
    assert sweeper.expire_holds(rt.engine) >= 1
    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
    assert (job.status, job.error_code) == ("failed", "HOLD_EXPIRED")


def _entries(rt, job_id):
    with rt.engine.connect() as conn:
        return sorted((r.type, r.amount) for r in conn.execute(
            select(transactions).where(transactions.c.job_id == job_id)))


def test_expired_hold_is_voided_and_a_late_result_is_charged_without_reviving_it(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    _expire(rt, job_id)
    assert wallet_of(rt.engine, company.company_id).credits_available == 1

    _save(rt, job_id)
    assert lifecycle.store(rt.engine, rt.storage, job_id)
    assert lifecycle.settle(rt.engine, job_id)
    assert not lifecycle.settle(rt.engine, job_id)  # a replay changes nothing

    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
        hold = conn.execute(select(credit_holds.c.status)
                            .where(credit_holds.c.job_id == job_id)).scalar_one()
    assert (job.status, job.error, job.actual_cost) == ("completed", None, COST)
    assert hold == "voided"
    assert _entries(rt, job_id) == [("debit", COST), ("refund", COST), ("reservation", COST)]
    assert wallet_of(rt.engine, company.company_id).credits_available == 1 - COST
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_late_result_on_an_empty_wallet_records_the_shortfall(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=COST)
    job_id = _job(rt, company)
    _expire(rt, job_id)
    other = _job(rt, company)
    lifecycle.reserve(rt.engine, other, ttl_seconds=60)  # takes the whole balance meanwhile

    _save(rt, job_id)
    lifecycle.store(rt.engine, rt.storage, job_id)
    lifecycle.settle(rt.engine, job_id)
    with rt.engine.connect() as conn:
        note = conn.execute(select(api_usage.c.metadata)
                            .where(api_usage.c.job_id == job_id)).scalar_one()
        job = get_job(conn, job_id)
    assert job.actual_cost == 0
    assert note["late"] is True
    assert Decimal(note["shortfall"]) == COST
    assert wallet_of(rt.engine, company.company_id).credits_available == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_every_step_replayed_after_completion_changes_nothing(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is None
    _save(rt, job_id)
    lifecycle.store(rt.engine, rt.storage, job_id)
    lifecycle.settle(rt.engine, job_id)
    before = _entries(rt, job_id)
    lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is None
    assert not lifecycle.store(rt.engine, rt.storage, job_id)
    assert not lifecycle.settle(rt.engine, job_id)
    assert not lifecycle.fail(rt.engine, job_id, code="X", message="late failure")
    assert _entries(rt, job_id) == before == [("debit", COST), ("reservation", COST)]
    assert_wallet_matches_ledger(rt.engine, company.company_id)
