"""The chain's use cases on PostgreSQL, driven directly: expiry, late results, replays."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import select

from pipeline import budgets, jobevents, lifecycle, sweeper
from pipeline.budgets import BudgetExceeded
from pipeline.errors import InsufficientCredits, LedgerConflict, NotFound
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.provider import GenerationRequest
from pipeline.tables import api_usage, credit_holds, metrics, transactions
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


def test_finish_stores_and_settles_once_and_finishes_a_stored_job(pg_runtime):
    """The finish task's use case: one read for store and settle; a replay changes
    nothing; a job stored by an earlier delivery that died before settling settles."""
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    first, second = _job(rt, company), _job(rt, company)
    for job_id in (first, second):
        lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
        assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
        _save(rt, job_id)
    assert lifecycle.finish(rt.engine, rt.storage, first)
    assert not lifecycle.finish(rt.engine, rt.storage, first)
    assert lifecycle.store(rt.engine, rt.storage, second)  # then the delivery died
    assert lifecycle.finish(rt.engine, rt.storage, second)
    for job_id in (first, second):
        with rt.engine.connect() as conn:
            job = get_job(conn, job_id)
        assert (job.status, job.actual_cost, job.stored_at is not None) == (
            "completed", COST, True)
        assert job.result["key"] == job.output_key
        assert _entries(rt, job_id) == [("debit", COST), ("reservation", COST)]
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    with pytest.raises(NotFound):
        lifecycle.finish(rt.engine, rt.storage, uuid.uuid4())


def _generated(rt):
    """A company and its job, held, claimed and with its output recorded: ready to finish."""
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
    _save(rt, job_id)
    return company, job_id


def _finished_rows(rt, job_id):
    with rt.engine.connect() as conn:
        usage_rows = conn.execute(select(api_usage.c.cost, api_usage.c.metadata,
                                         api_usage.c.usage, api_usage.c.provider)
                                  .where(api_usage.c.job_id == job_id)).all()
        metric_rows = conn.execute(select(metrics.c.name, metrics.c.value, metrics.c.labels)
                                   .where(metrics.c.job_id == job_id)).all()
    return usage_rows, metric_rows


def test_settle_writes_the_usage_and_metrics_rows_with_the_completion(pg_runtime):
    """On PostgreSQL the completion, the ledger's settle and both analytics rows are one
    statement: the rows say what the ledger did, once, and a replay adds none."""
    rt = pg_runtime
    company, job_id = _generated(rt)
    assert lifecycle.finish(rt.engine, rt.storage, job_id)
    assert not lifecycle.settle(rt.engine, job_id)
    usage_rows, metric_rows = _finished_rows(rt, job_id)
    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
    [(cost, note, used, provider)] = usage_rows
    assert (cost, provider, used) == (COST, "local", job.output.get("usage", {}))
    assert note == {"status": "completed", "estimatedCost": str(job.estimated_cost)}
    [(name, seconds, labels)] = metric_rows
    assert name == "job_finished"
    assert 0 <= seconds <= (job.completed_at - job.created_at).total_seconds() + 1e-6
    assert labels == {"status": "completed", "provider": "local", "content_type": "image",
                      "company_id": str(company.company_id), "error_code": None,
                      "cost": "0.002000", "estimated_cost": str(job.estimated_cost),
                      "attempts": job.attempts}
    assert (job.status, job.actual_cost) == ("completed", COST)
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_a_ledger_conflict_at_settle_leaves_the_job_its_hold_and_its_rows_as_they_were(
        pg_runtime):
    """An entry already under the job's debit key (the ledger disagreeing with itself):
    the settle is refused whole, the completion and the analytics rows with it."""
    rt = pg_runtime
    company, job_id = _generated(rt)
    with rt.engine.begin() as conn:
        conn.execute(transactions.insert().values(
            id=uuid.uuid4(), wallet_id=company.wallet_id, job_id=job_id, type="debit",
            amount=Decimal(5), idempotency_key=f"debit:{job_id}"))
    with pytest.raises(LedgerConflict):
        lifecycle.finish(rt.engine, rt.storage, job_id)
    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
        hold = conn.execute(select(credit_holds.c.status)
                            .where(credit_holds.c.job_id == job_id)).scalar_one()
    assert (job.status, job.settled_at, job.actual_cost, hold) == (
        "processing", None, None, "open")
    assert _finished_rows(rt, job_id) == ([], [])


# reserve() on PostgreSQL: one statement for a company without budgets


def _hold_state(rt, job_id):
    with rt.engine.connect() as conn:
        holds = conn.execute(select(credit_holds.c.amount, credit_holds.c.status)
                             .where(credit_holds.c.job_id == job_id)).all()
        job = get_job(conn, job_id)
    return holds, job.reserved_at


def test_reserve_holds_once_and_a_replay_keeps_the_first_time(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    holds, first_time = _hold_state(rt, job_id)
    assert holds == [(COST, "open")]
    assert first_time is not None
    assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)  # a second delivery
    assert _hold_state(rt, job_id) == (holds, first_time)
    assert _entries(rt, job_id) == [("reservation", COST)]
    wallet = wallet_of(rt.engine, company.company_id)
    assert (wallet.credits_available, wallet.credits_held) == (1 - COST, COST)
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_reserve_on_a_short_wallet_writes_nothing(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=COST)
    first, second = _job(rt, company), _job(rt, company)
    assert lifecycle.reserve(rt.engine, first, ttl_seconds=60)
    with pytest.raises(InsufficientCredits):
        lifecycle.reserve(rt.engine, second, ttl_seconds=60)
    assert _hold_state(rt, second) == ([], None)  # no hold, and the job is not marked
    assert _entries(rt, second) == []
    assert wallet_of(rt.engine, company.company_id).credits_available == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_reserve_of_an_ended_or_unknown_job(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    assert lifecycle.fail(rt.engine, job_id, code="X", message="ended before its hold")
    assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=60) is False
    assert _hold_state(rt, job_id)[0] == []
    with pytest.raises(NotFound):
        lifecycle.reserve(rt.engine, uuid.uuid4(), ttl_seconds=60)


def test_a_budgeted_company_is_still_held_to_its_budget(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    budgets.set_budget(rt.engine, company.company_id, period="day", cap=COST / 2)
    with pytest.raises(BudgetExceeded):
        lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    assert _hold_state(rt, job_id) == ([], None)
    assert wallet_of(rt.engine, company.company_id).credits_available == 1


def test_deliveries_of_one_job_racing_hold_it_once(pg_runtime):
    """Eight deliveries of the same reserve at once, for twenty jobs: each job gets one
    hold and one entry, and the wallet moves once per job."""
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_ids = [_job(rt, company) for _ in range(20)]
    errors = []

    def deliver(job_id, go):
        go.wait()
        try:
            assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    for job_id in job_ids:
        go = threading.Event()
        threads = [threading.Thread(target=deliver, args=(job_id, go)) for _ in range(8)]
        for thread in threads:
            thread.start()
        go.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    for job_id in job_ids:
        assert _entries(rt, job_id) == [("reservation", COST)]
        assert _hold_state(rt, job_id)[0] == [(COST, "open")]
    assert wallet_of(rt.engine, company.company_id).credits_held == COST * len(job_ids)
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_reservations_racing_on_one_wallet_never_overdraw(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=COST * 10)
    job_ids = [_job(rt, company) for _ in range(25)]
    outcomes = []

    def one(job_id):
        try:
            outcomes.append(lifecycle.reserve(rt.engine, job_id, ttl_seconds=60))
        except InsufficientCredits:
            outcomes.append("short")

    threads = [threading.Thread(target=one, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert (outcomes.count(True), outcomes.count("short")) == (10, 15)
    wallet = wallet_of(rt.engine, company.company_id)
    assert (wallet.credits_available, wallet.credits_held) == (0, COST * 10)
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_a_heartbeat_whose_progress_does_not_move_is_no_event(pg_runtime):
    rt = pg_runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
    heard = []

    class Recording(jobevents.Announcer):
        def job_changed(self, job_id, event):
            heard.append(event)

    previous = jobevents.installed()
    jobevents.install(Recording())
    try:
        for progress in (0.25, 0.25, 0.1, 0.5, 0.5):
            assert lifecycle.heartbeat(rt.engine, job_id, progress=progress)
    finally:
        jobevents.install(previous)
    assert heard == ["progress", "progress"]  # 0.25 and 0.5; repeats and 0.1 are beats only
    with rt.engine.connect() as conn:
        assert get_job(conn, job_id).progress == 0.5
    lifecycle.fail(rt.engine, job_id, code="X", message="ended")
    assert not lifecycle.heartbeat(rt.engine, job_id, progress=0.9)  # no longer processing
