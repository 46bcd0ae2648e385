"""Cancel-After deadlines: the header, and the sweeper's deadline pass through real workers
and beat (a queued job refunded in full; a Runway render deleted at the provider), and
the pass's use of ix_jobs_cancel_after on PostgreSQL."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from pipeline.audit import audit
from pipeline.cancel import DEADLINE, parse_cancel_after
from pipeline.db import utcnow
from pipeline.errors import ValidationFailed
from pipeline.sweeper import cancel_overdue, overdue_jobs
from pipeline.tables import jobs
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    job_row,
    ledger_entries,
    make_company,
    wait_for,
    wallet_of,
)
from tests.conftest import distributed_env, runtime_for
from tests.fakes.runway import FakeRunway

CREDITS = 1000
KEY = "sk-platform-key-for-deadline-tests"
IMAGE = {"contentType": "image", "prompt": "a square", "settings": {"width": 100, "height": 100}}


@pytest.fixture
def stack(empty_pg_database, own_redis_prefix, tmp_path):
    """stack(**env) -> (env, runtime, API client, company) on a database of this test's own:
    beat's sweeps there touch no other test's jobs."""
    from api import create_app

    runtimes = []

    def make(**extra):
        env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                              storage_url=f"file://{tmp_path}/store",
                              SWEEP_INTERVAL_SECONDS="0.5", **extra)
        rt = runtime_for(env)
        runtimes.append(rt)
        return env, rt, create_app(rt).test_client(), make_company(rt.engine, credits=CREDITS)

    yield make
    for rt in runtimes:
        rt.engine.dispose()


def _submit(client, key, body=IMAGE, cancel_after="5s"):
    resp = client.post("/v1/jobs", headers={**auth(key), "Cancel-After": cancel_after},
                       json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


def _view(client, key, job_id):
    resp = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def _assert_cancelled_by_deadline(view):
    assert view["status"] == "cancelled"
    assert view["cancelledBy"] == DEADLINE
    assert view["error"]["code"] == "CANCELLED"
    assert "Cancel-After deadline" in view["error"]["message"]
    cancelled_at = datetime.fromisoformat(view["cancelledAt"])
    assert cancelled_at >= datetime.fromisoformat(view["cancelAfter"])


def _audit_clean(rt, company):
    assert audit(rt.engine) == []  # the test's own database: every finding is ours
    assert_wallet_matches_ledger(rt.engine, company.company_id)


@pytest.mark.parametrize(("header", "seconds"), [
    ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400), ("90", 90), ("7.5", 7.5),
    (" 2M ", 120), ("24h", 86400), ("1h0m5s", 3605),
])
def test_the_cancel_after_grammar(header, seconds):
    assert parse_cancel_after(header) == timedelta(seconds=seconds)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_malformed_cancel_after_is_400_and_makes_no_job(api_stack):
    _env, rt, client, company = api_stack(CREDITS)
    for bad in ("", "soon", "4s", "4.9", "25h", "24h1s", "-30s", "1m1h", "1e3", "30 s",
                "5 minutes", "9" * 400, "PT30S"):
        resp = client.post("/v1/jobs", json=IMAGE,
                           headers={**auth(company.api_key), "Cancel-After": bad})
        assert resp.status_code == 400, bad
        body = resp.get_json()
        assert (body["code"], body["details"]["field"]) == ("VALIDATION_ERROR", "Cancel-After")
        with pytest.raises(ValidationFailed):
            parse_cancel_after(bad)
    with rt.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(jobs)
                           .where(jobs.c.company_id == company.company_id)) == 0
    # Without the header there is no deadline; with one, the view shows it.
    plain = _view(client, company.api_key, _submit_plain(client, company.api_key))
    assert (plain["cancelAfter"], plain["cancelledBy"], plain["cancelledAt"]) == (None,) * 3
    before = utcnow()
    timed = _view(client, company.api_key, _submit(client, company.api_key, cancel_after="1h"))
    deadline = datetime.fromisoformat(timed["cancelAfter"])
    assert before + timedelta(hours=1) <= deadline <= utcnow() + timedelta(hours=1)
    # The contract says so: the header on POST /v1/jobs, the three fields on a job.
    document = client.get("/openapi.json").get_json()
    parameters = document["paths"]["/v1/jobs"]["post"]["parameters"]
    assert "Cancel-After" in {p["name"] for p in parameters if p["in"] == "header"}
    job = document["components"]["schemas"]["Job"]["properties"]
    assert {"cancelAfter", "cancelledBy", "cancelledAt"} <= set(job)


def _submit_plain(client, key):
    resp = client.post("/v1/jobs", headers=auth(key), json=IMAGE)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


@pytest.mark.postgres
@pytest.mark.redis
def test_a_job_still_queued_at_its_deadline_is_cancelled_and_refunded(stack, start_worker):
    env, rt, client, company = stack()
    # The pipeline queue's worker takes the hold; no worker serves the local queue, so the
    # job waits there. Beat's sweep, on the maintenance queue, meets its deadline.
    start_worker(env, queues=["pipeline", "maintenance"], concurrency=2, beat=True)
    # 8 s: time enough for the hold to be taken first, even on a loaded machine.
    job_id = _submit(client, company.api_key, cancel_after="8s")
    later = _submit(client, company.api_key, cancel_after="1h")
    wait_for(lambda: job_row(rt.engine, job_id).reserved_at, timeout=30, message="the hold")
    held = job_row(rt.engine, job_id).estimated_cost
    assert held > 0
    assert job_row(rt.engine, job_id).status == "queued"
    wait_for(lambda: job_row(rt.engine, job_id).status == "cancelled", timeout=20,
             message="the deadline's cancel")

    _assert_cancelled_by_deadline(_view(client, company.api_key, job_id))
    assert ledger_entries(rt.engine, job_id) == ["refund", "reservation"]
    assert job_row(rt.engine, later).status == "queued"  # its deadline is an hour away
    later_hold = job_row(rt.engine, later).estimated_cost
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS - later_hold
    _audit_clean(rt, company)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_render_past_its_deadline_is_deleted_at_runway_and_refunded(stack, start_worker):
    runway = FakeRunway(api_key=KEY).start()
    runway.config["polls_to_finish"] = 10**9  # renders until it is stopped
    try:
        env, rt, client, company = stack(RUNWAY_BASE_URL=runway.url, RUNWAY_API_KEY=KEY,
                                         POLL_INTERVAL_SECONDS="0.2")
        start_worker(env, concurrency=4, beat=True)
        job_id = _submit(client, company.api_key, {
            "contentType": "video", "prompt": "a calm sea", "provider": "runway",
            "settings": {"duration": 5}}, cancel_after="1h")
        wait_for(lambda: job_row(rt.engine, job_id).remote_id, timeout=30,
                 message="the remote task")
        time.sleep(1)  # a few polls: the render is under way, and stays so
        assert job_row(rt.engine, job_id).status == "processing"
        assert not runway.received("delete")
        # The hour passes (the queued test waits for a real deadline): the sweep finds it.
        with rt.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == uuid.UUID(job_id))
                         .values(cancel_after=utcnow() - timedelta(seconds=1)))
        wait_for(lambda: runway.received("delete"), timeout=30, message="Runway's DELETE")
    finally:
        runway.stop()
    assert len(runway.received("delete")) == 1
    _assert_cancelled_by_deadline(_view(client, company.api_key, job_id))
    assert ledger_entries(rt.engine, job_id) == ["refund", "reservation"]
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
    _audit_clean(rt, company)


@pytest.mark.postgres
def test_the_deadline_pass_reads_its_partial_index(empty_pg_database, tmp_path):
    """Thousands of finished jobs and a few live ones with deadlines, analysed: the pass
    goes through ix_jobs_cancel_after, and cancels exactly the overdue live ones."""
    env = distributed_env(tmp_path, empty_pg_database, "unused:",
                          storage_url=f"file://{tmp_path}/store")
    rt = runtime_for(env)
    try:
        company = make_company(rt.engine, credits=CREDITS)
        with rt.engine.begin() as conn:
            conn.execute(text("""
                INSERT INTO jobs (id, company_id, provider, content_type, status, prompt,
                                  estimated_cost, updated_at, created_at, cancel_after)
                SELECT gen_random_uuid(), :company, 'local', 'image',
                       CASE WHEN g % 500 = 0 THEN 'queued' ELSE 'completed' END, 'p', 0,
                       now(), now() - g * interval '1 second',
                       CASE WHEN g % 2 = 0 THEN now() - interval '1 minute' END
                FROM generate_series(1, 20000) AS g"""), {"company": company.company_id})
            conn.execute(text("ANALYZE jobs"))
            query = overdue_jobs(utcnow(), 100).compile(dialect=conn.dialect)
            plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + str(query), query.params)
                             .scalars())
        assert "ix_jobs_cancel_after" in plan, plan
        assert cancel_overdue(rt.engine) == 40  # g = 500, 1000, ... 20000: all even
        assert cancel_overdue(rt.engine) == 0
        with rt.engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(jobs)
                               .where(jobs.c.cancelled_by == DEADLINE)) == 40
    finally:
        rt.engine.dispose()


def test_a_job_past_its_deadline_on_the_embedded_database_is_cancelled(tmp_path):
    """SQLite: the same pass, with its partial index, on the embedded default."""
    from api import create_app
    from pipeline.config import Settings
    from pipeline.db import init_db
    from service.runtime import build_runtime

    rt = build_runtime(Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"),
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env")}))
    init_db(rt.engine)
    try:
        company = make_company(rt.engine, credits=CREDITS)
        client = create_app(rt).test_client()
        job_id = _submit(client, company.api_key, cancel_after="5s")
        assert cancel_overdue(rt.engine) == 0
        with rt.engine.begin() as conn:  # five seconds later, without the wait
            conn.execute(jobs.update().where(jobs.c.id == uuid.UUID(job_id))
                         .values(cancel_after=utcnow() - timedelta(seconds=1)))
        assert cancel_overdue(rt.engine) == 1
        _assert_cancelled_by_deadline(_view(client, company.api_key, job_id))
        assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
        assert_wallet_matches_ledger(rt.engine, company.company_id)
    finally:
        rt.engine.dispose()
