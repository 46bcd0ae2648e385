"""The submit and read paths' database work: how many statements a POST and a GET send
(each one a round trip), that the one-read quote keeps the checks it replaced, and the
hold a submit takes when the wallet covers it."""

from __future__ import annotations

from decimal import Decimal

import psycopg.pq
import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from api import create_app
from pipeline import budgets, lifecycle, tables
from tests.builders import assert_wallet_matches_ledger, auth, make_company, wallet_of
from tests.conftest import distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

IDLE = psycopg.pq.TransactionStatus.IDLE

# The key's read; BEGIN, the quote, the job with its outbox row, COMMIT; the hold (one
# statement on its own); the mark.
SUBMIT_STATEMENTS = 7
# The key's read, the job's, and its queue position (the job is still queued).
GET_STATEMENTS = 3


@pytest.fixture
def api(empty_pg_database, own_redis_prefix, tmp_path):
    env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store", RATE_LIMITS_ENABLED="0")
    runtime = runtime_for(env)
    try:
        yield runtime, create_app(runtime).test_client()
    finally:
        runtime.engine.dispose()


def _count(engine) -> list[str]:
    """Every statement the engine sends, BEGIN/COMMIT/ROLLBACK included, as they happen."""
    sent: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, *args):
        raw = conn.connection.dbapi_connection
        if not raw.autocommit and raw.info.transaction_status == IDLE:
            sent.append("BEGIN")  # psycopg sends it ahead of the statement
        sent.append(statement.split()[0])

    def _ends(name):
        def listener(conn):
            raw = conn.connection.dbapi_connection
            if raw is not None and raw.info.transaction_status != IDLE:
                sent.append(name)  # a transaction was open: this is a round trip
        return listener

    event.listen(engine, "commit", _ends("COMMIT"))
    event.listen(engine, "rollback", _ends("ROLLBACK"))
    return sent


def test_submit_and_get_send_few_statements(api):
    runtime, client = api
    company = make_company(runtime.engine, credits=100, name="rt")
    client.get("/v1/jobs/00000000-0000-0000-0000-000000000000",
               headers=auth(company.api_key))  # the pool's first connection, outside
    sent = _count(runtime.engine)
    answer = client.post("/v1/jobs", headers=auth(company.api_key),
                         json={"contentType": "text", "provider": "local", "prompt": "hi"})
    assert answer.status_code == 202, answer.get_json()
    assert len(sent) == SUBMIT_STATEMENTS, sent
    job_id = answer.get_json()["jobId"]
    with runtime.engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id)).one()
        outbox = conn.execute(select(tables.job_dispatches)
                              .where(tables.job_dispatches.c.job_id == job_id)).one()
    assert (job.status, outbox.attempts, outbox.sent_at is not None) == ("queued", 1, True)
    sent.clear()
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).status_code == 200
    assert len(sent) == GET_STATEMENTS, sent


def test_budget_still_refuses_and_unpriced_provider_still_400(api):
    """The budgets read is skipped only for a company without budgets; a provider with no
    price row is still refused, not priced at zero."""
    runtime, client = api
    company = make_company(runtime.engine, credits=100, name="capped")
    budgets.set_budget(runtime.engine, company.company_id, period="day", cap="0")
    answer = client.post("/v1/jobs", headers=auth(company.api_key),
                         json={"contentType": "text", "provider": "local", "prompt": "hi"})
    assert (answer.status_code, answer.get_json()["code"]) == (402, "BUDGET_EXCEEDED")
    with runtime.engine.begin() as conn:
        conn.execute(tables.providers.delete().where(tables.providers.c.name == "local"))
    other = make_company(runtime.engine, credits=100, name="free")
    answer = client.post("/v1/jobs", headers=auth(other.api_key),
                         json={"contentType": "text", "provider": "local", "prompt": "hi"})
    assert answer.status_code == 400, answer.get_json()
    with runtime.engine.connect() as conn:
        assert conn.execute(select(tables.jobs.c.id)).first() is None


def _post(client, company, **body):
    return client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": "video", "provider": "local", "prompt": "p",
                             "settings": {"duration": 4}, **body})


def _job_and_hold(runtime, job_id):
    with runtime.engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id)).one()
        hold = conn.execute(select(tables.credit_holds)
                            .where(tables.credit_holds.c.job_id == job_id)).first()
    return job, hold


def test_the_submit_takes_the_hold_when_the_wallet_covers_it(api):
    runtime, client = api
    company = make_company(runtime.engine, credits="0.3", name="held")
    answer = _post(client, company)  # a 4 s video on local: 0.2
    assert answer.status_code == 202, answer.get_json()
    job_id = answer.get_json()["jobId"]
    job, hold = _job_and_hold(runtime, job_id)
    assert job.reserved_at is not None
    assert (hold.status, hold.amount) == ("open", job.estimated_cost)
    wallet = wallet_of(runtime.engine, company.company_id)
    assert (wallet.credits_held, wallet.credits_available) == (Decimal("0.2"), Decimal("0.1"))
    # The reserve step of a whole chain (the sweeper's relay, a chain queued before the
    # upgrade) finds the hold and takes nothing more.
    assert lifecycle.reserve(runtime.engine, job.id, ttl_seconds=600)
    assert wallet_of(runtime.engine, company.company_id) == wallet
    assert_wallet_matches_ledger(runtime.engine, company.company_id)
    # What is left (0.1) plainly cannot cover another: refused at once, nothing written.
    again = _post(client, company)
    assert (again.status_code, again.get_json()["code"]) == (402, "INSUFFICIENT_CREDITS")
    with runtime.engine.connect() as conn:
        assert conn.execute(select(tables.jobs.c.id)
                            .where(tables.jobs.c.company_id == company.company_id)
                            ).scalars().all() == [job.id]


def test_a_company_with_budgets_is_held_by_the_reserve_step(api):
    """The budgets are checked under their lock by the chain's reserve step; the submit
    takes no hold for such a company, and its chain keeps that step."""
    runtime, client = api
    company = make_company(runtime.engine, credits=5, name="budgeted")
    budgets.set_budget(runtime.engine, company.company_id, period="day", cap="100")
    answer = _post(client, company)
    assert answer.status_code == 202, answer.get_json()
    job, hold = _job_and_hold(runtime, answer.get_json()["jobId"])
    assert (job.reserved_at, hold) == (None, None)
    assert wallet_of(runtime.engine, company.company_id).credits_held == 0


def test_with_hold_at_submit_off_the_reserve_step_takes_every_hold(empty_pg_database,
                                                                    own_redis_prefix,
                                                                    tmp_path):
    env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store", RATE_LIMITS_ENABLED="0",
                          HOLD_AT_SUBMIT="0")
    runtime = runtime_for(env)
    try:
        assert runtime.settings.hold_at_submit is False
        company = make_company(runtime.engine, credits="0.3", name="off")
        client = create_app(runtime).test_client()
        answers = [_post(client, company) for _ in range(2)]
        # No hold yet: the second passes the fast check too, and its reserve step decides.
        assert [a.status_code for a in answers] == [202, 202]
        for answer in answers:
            job, hold = _job_and_hold(runtime, answer.get_json()["jobId"])
            assert (job.reserved_at, hold) == (None, None)
        assert wallet_of(runtime.engine, company.company_id).credits_held == 0
    finally:
        runtime.engine.dispose()


def test_a_database_error_after_the_commit_leaves_the_hold_to_the_reserve_step(api,
                                                                              monkeypatch):
    """The job is committed when the hold is tried: a failure there is no failed POST."""
    runtime, client = api
    company = make_company(runtime.engine, credits=5, name="blip")

    def blip(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(lifecycle, "_reserve_at_once", blip)
    answer = _post(client, company)
    assert answer.status_code == 202, answer.get_json()
    job, hold = _job_and_hold(runtime, answer.get_json()["jobId"])
    assert (job.status, job.reserved_at, hold) == ("queued", None, None)
    monkeypatch.undo()
    # Its chain is whole: the reserve step takes the hold.
    assert lifecycle.reserve(runtime.engine, job.id, ttl_seconds=600)
    assert _job_and_hold(runtime, job.id)[1].status == "open"
