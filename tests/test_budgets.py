"""Company, user and key budgets per calendar period, and the admin money endpoints."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

import pytest

from api import create_app
from pipeline import budgets, ledger, lifecycle
from pipeline.audit import audit
from pipeline.budgets import BudgetExceeded
from pipeline.db import utcnow
from pipeline.errors import InsufficientCredits
from pipeline.jobs import JobRequest, Principal, submit_job
from tests.builders import assert_wallet_matches_ledger, auth, make_company, wallet_of

pytestmark = pytest.mark.postgres

# A 100x100 local image: estimate = actual = 0.002 credits.
IMAGE = JobRequest("image", "a red square", {"width": 100, "height": 100})
COST = Decimal("0.002")


def _principal(company, *, user=True):
    return Principal(company.company_id, company.user_id if user else None, None)


def _submit(runtime, principal):
    return submit_job(runtime.engine, runtime.registry, principal=principal, req=IMAGE,
                      max_prompt_length=4000)


def _run_to_settled(runtime, job_id):
    """Drive the ledger side of a job the way the chain does, without a provider."""
    lifecycle.reserve(runtime.engine, job_id, ttl_seconds=60)
    with runtime.engine.begin() as conn:
        ledger.settle(conn, job_id, COST)


def test_company_budget_refuses_at_submit_once_spend_plus_holds_reach_the_cap(pg_runtime):
    company = make_company(pg_runtime.engine, credits=10)
    budgets.set_budget(pg_runtime.engine, company.company_id, period="day", cap="0.005")
    first = _submit(pg_runtime, _principal(company))
    _run_to_settled(pg_runtime, first["id"])                     # spent 0.002
    second = _submit(pg_runtime, _principal(company))
    lifecycle.reserve(pg_runtime.engine, second["id"], ttl_seconds=60)  # held 0.002
    with pytest.raises(BudgetExceeded) as refused:
        _submit(pg_runtime, _principal(company))                 # 0.006 > 0.005
    assert refused.value.details["spent"] == "0.002000"
    assert refused.value.details["held"] == "0.002000"
    assert refused.value.status == 402


def test_budget_is_enforced_again_at_reserve(pg_runtime):
    company = make_company(pg_runtime.engine, credits=10)
    budgets.set_budget(pg_runtime.engine, company.company_id, period="month", cap="0.003")
    a, b = (_submit(pg_runtime, _principal(company)) for _ in range(2))  # both pass the fast check
    lifecycle.reserve(pg_runtime.engine, a["id"], ttl_seconds=60)
    with pytest.raises(BudgetExceeded):
        lifecycle.reserve(pg_runtime.engine, b["id"], ttl_seconds=60)
    assert wallet_of(pg_runtime.engine, company.company_id).credits_held == COST


def test_user_and_key_budgets_only_govern_their_subject(pg_runtime):
    company = make_company(pg_runtime.engine, credits=10)
    budgets.set_budget(pg_runtime.engine, company.company_id, period="day", cap="0.001",
                       scope="user", subject=str(company.user_id))
    with pytest.raises(BudgetExceeded):
        _submit(pg_runtime, _principal(company))
    assert _submit(pg_runtime, _principal(company, user=False))  # no user: not governed
    with pytest.raises(Exception, match="subject"):
        budgets.set_budget(pg_runtime.engine, company.company_id, period="day", cap=1,
                           scope="api_key", subject="not-an-id")


def test_a_new_period_starts_from_what_ran_in_it_while_holds_still_count(pg_runtime):
    company = make_company(pg_runtime.engine, credits=10)
    budgets.set_budget(pg_runtime.engine, company.company_id, period="day", cap="0.004")
    done = _submit(pg_runtime, _principal(company))
    _run_to_settled(pg_runtime, done["id"])
    running = _submit(pg_runtime, _principal(company))
    lifecycle.reserve(pg_runtime.engine, running["id"], ttl_seconds=60)
    tomorrow = budgets.period_start("day") + timedelta(days=1, hours=1)
    with pg_runtime.engine.connect() as conn:
        (budget,) = budgets.applicable(conn, company.company_id, None, None, lock=False)
        assert budgets.usage(conn, budget) == (COST, COST)
        assert budgets.usage(conn, budget, tomorrow) == (Decimal(0), COST)
        budgets.check(conn, company.company_id, None, None, COST, lock=False, now=tomorrow)
        with pytest.raises(BudgetExceeded):
            budgets.check(conn, company.company_id, None, None, COST, lock=False)


def test_period_boundaries_are_utc_calendar_days_and_months():
    now = utcnow().replace(year=2026, month=3, day=31, hour=23, minute=59)
    assert budgets.period_start("day", now).isoformat() == "2026-03-31T00:00:00+00:00"
    assert budgets.period_start("month", now).isoformat() == "2026-03-01T00:00:00+00:00"


def test_concurrent_reservations_never_pass_the_budget(pg_runtime):
    """20 reservations race for a budget that allows 5; the wallet could pay for all."""
    company = make_company(pg_runtime.engine, credits=100)
    budgets.set_budget(pg_runtime.engine, company.company_id, period="day", cap=str(COST * 5))
    jobs = [_submit(pg_runtime, _principal(company)) for _ in range(20)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(jobs))

    def attempt(job_id):
        barrier.wait()
        try:
            lifecycle.reserve(pg_runtime.engine, job_id, ttl_seconds=60)
            outcomes.append("held")
        except (BudgetExceeded, InsufficientCredits) as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=attempt, args=(j["id"],)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("held") == 5
    assert outcomes.count("BUDGET_EXCEEDED") == 15
    assert wallet_of(pg_runtime.engine, company.company_id).credits_held == COST * 5
    assert_wallet_matches_ledger(pg_runtime.engine, company.company_id)


def test_admin_deposit_refund_and_budget_endpoints(pg_runtime):
    client = create_app(pg_runtime).test_client()
    company = make_company(pg_runtime.engine, credits=1)
    admin = auth(company.admin_key)
    body = {"amount": "2.5", "reference": "invoice-17", "reason": "top-up"}
    first = client.post("/v1/wallet/deposits", headers=admin, json=body)
    again = client.post("/v1/wallet/deposits", headers=admin, json=body)
    assert first.status_code == again.status_code == 201
    assert (first.get_json()["created"], again.get_json()["created"]) == (True, False)
    assert again.get_json()["wallet"]["available"] == "3.500000"
    assert client.post("/v1/wallet/deposits", headers=auth(company.api_key),
                       json=body).status_code == 403

    job = _submit(pg_runtime, _principal(company))
    _run_to_settled(pg_runtime, job["id"])
    refund = {"jobId": str(job["id"]), "amount": "0.0015", "reference": "ticket-9"}
    assert client.post("/v1/wallet/refunds", headers=admin, json=refund).status_code == 201
    assert client.post("/v1/wallet/refunds", headers=admin, json=refund
                       ).get_json()["created"] is False
    too_much = {"jobId": str(job["id"]), "amount": "0.001", "reference": "ticket-10"}
    resp = client.post("/v1/wallet/refunds", headers=admin, json=too_much)
    assert resp.status_code == 400
    assert resp.get_json()["details"]["alreadyRefunded"] == "0.001500"
    wallet = wallet_of(pg_runtime.engine, company.company_id)
    assert wallet.credits_used == Decimal("0.0005")
    assert_wallet_matches_ledger(pg_runtime.engine, company.company_id)
    mine = {str(company.wallet_id), str(job["id"])}
    assert [f for f in audit(pg_runtime.engine) if f.subject in mine] == []

    other = make_company(pg_runtime.engine, credits=1, name="other")
    resp = client.post("/v1/wallet/refunds", headers=auth(other.admin_key),
                       json={**refund, "reference": "x"})
    assert resp.status_code == 404

    resp = client.put("/v1/wallet/budgets", headers=admin, json={"period": "day", "cap": "1"})
    assert resp.status_code == 200
    assert resp.get_json()[0]["cap"] == "1.000000"
    shown = client.get("/v1/wallet", headers=auth(company.api_key)).get_json()
    assert shown["budgets"][0]["period"] == "day"
    assert client.put("/v1/wallet/budgets", headers=admin,
                      json={"period": "week", "cap": "1"}).status_code == 400
