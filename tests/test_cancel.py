"""POST /v1/jobs/<id>/cancel at each stage of a job, through real workers and fakes:
queued, reserved, generating on a polled provider (Runway), generating on ComfyUI; the
refund, the provider told to stop, the ledger audit clean, and cancel racing completion."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest

from pipeline import lifecycle
from pipeline.audit import audit
from pipeline.cancel import JobAlreadyFinished, cancel_job
from pipeline.config import Settings
from pipeline.db import init_db
from pipeline.errors import NotFound
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.provider import GenerationRequest
from providers.local import LocalProvider
from service.runtime import build_runtime
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    job_row,
    ledger_entries,
    make_company,
    wait_for,
    wait_terminal,
    wallet_of,
)
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.runway import FakeRunway

KEY = "sk-platform-key-for-cancel-tests"
CREDITS = 1000


def _submit(client, key, body=None):
    body = body or {"contentType": "image", "prompt": "a square",
                    "settings": {"width": 100, "height": 100}}
    resp = client.post("/v1/jobs", headers=auth(key), json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


def _cancel(client, key, job_id):
    return client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))


def _job(rt, job_id):
    return job_row(rt.engine, job_id)


def _entries(rt, job_id):
    return ledger_entries(rt.engine, job_id)


def _audit_clean(rt, company, job_ids):
    """The ledger audit finds nothing on this test's wallet and jobs (the database is
    shared with other tests, whose deliberate breakage is theirs)."""
    ours = {str(company.wallet_id), *map(str, job_ids)}
    assert [f for f in audit(rt.engine) if f.subject in ours] == []
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def _assert_cancelled(view, key_id=None):
    assert view["status"] == "cancelled"
    assert view["error"]["code"] == "CANCELLED"
    assert view["error"]["message"].startswith("Cancelled by API key ")
    assert view["completedAt"] is not None
    assert view["cancelledBy"].startswith("API key ")
    assert view["cancelledAt"] == view["completedAt"]
    if key_id is not None:
        assert str(key_id) in view["error"]["message"]
        assert view["cancelledBy"] == f"API key {key_id}"


@pytest.mark.postgres
@pytest.mark.redis
def test_cancel_before_generation_refunds_in_full_and_the_worker_does_nothing(
        api_stack, start_worker):
    env, rt, client, company = api_stack(CREDITS)
    # Published, not yet consumed (no worker): each holds its credits from its submit on.
    queued = _submit(client, company.api_key)
    reserved = _submit(client, company.api_key)
    assert lifecycle.reserve(rt.engine, uuid.UUID(reserved), ttl_seconds=3600)  # a replay
    held = _job(rt, queued).estimated_cost + _job(rt, reserved).estimated_cost
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS - held

    resp = _cancel(client, company.api_key, queued)
    assert resp.status_code == 200, resp.get_json()
    _assert_cancelled(resp.get_json(), _job(rt, queued).api_key_id)
    resp = _cancel(client, company.admin_key, reserved)  # any key of the company
    assert resp.status_code == 200, resp.get_json()
    _assert_cancelled(resp.get_json())
    assert _entries(rt, queued) == ["refund", "reservation"]
    assert _entries(rt, reserved) == ["refund", "reservation"]
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS

    # A second cancel, and a cancel of a finished job: 409 with its status.
    resp = _cancel(client, company.api_key, queued)
    assert resp.status_code == 409
    assert resp.get_json()["code"] == "JOB_ALREADY_FINISHED"
    assert resp.get_json()["details"]["status"] == "cancelled"
    # Another company's job, or no job at all: 404, and nothing changes.
    other = make_company(rt.engine, CREDITS, name="other")
    theirs = _submit(client, other.api_key)
    for job_id in (theirs, str(uuid.uuid4()), "not-a-uuid"):
        resp = _cancel(client, company.api_key, job_id)
        assert resp.status_code == 404, job_id
        assert resp.get_json()["code"] == "JOB_NOT_FOUND"
    assert _job(rt, theirs).status == "queued"

    # The workers come: the cancelled jobs' messages do nothing, the others complete.
    start_worker(env, queues=["pipeline", "local"], concurrency=2)
    assert wait_terminal(rt.engine, [theirs], timeout=30)[theirs] == "completed"
    done = _submit(client, company.api_key)
    assert wait_terminal(rt.engine, [done], timeout=30)[done] == "completed"
    for job_id in (queued, reserved):
        job = _job(rt, job_id)
        assert (job.status, job.attempts, job.output_key) == ("cancelled", 0, None)
        assert _entries(rt, job_id) == ["refund", "reservation"]
    resp = _cancel(client, company.api_key, done)
    assert (resp.status_code, resp.get_json()["details"]["status"]) == (409, "completed")
    _audit_clean(rt, company, [queued, reserved, done])
    assert "/v1/jobs/{job_id}/cancel" in client.get("/openapi.json").get_json()["paths"]


@pytest.mark.postgres
@pytest.mark.redis
def test_cancel_while_a_runway_video_renders_deletes_the_task_and_refunds(
        api_stack, start_worker):
    runway = FakeRunway(api_key=KEY).start()
    try:
        env, rt, client, company = api_stack(CREDITS, RUNWAY_BASE_URL=runway.url,
                                             RUNWAY_API_KEY=KEY, POLL_INTERVAL_SECONDS="0.05")
        runway.config["polls_to_finish"] = 10**9  # renders until it is stopped
        start_worker(env, concurrency=4)
        job_id = _submit(client, company.api_key, {
            "contentType": "video", "prompt": "a calm sea", "provider": "runway",
            "settings": {"duration": 5}})
        wait_for(lambda: _job(rt, job_id).remote_id, timeout=30, message="the remote task")
        resp = _cancel(client, company.api_key, job_id)
        assert resp.status_code == 200, resp.get_json()
        _assert_cancelled(resp.get_json())
        wait_for(lambda: runway.received("delete"), timeout=15, message="Runway's DELETE")
    finally:
        runway.stop()
    assert len(runway.received("delete")) == 1
    assert _job(rt, job_id).status == "cancelled"
    assert _entries(rt, job_id) == ["refund", "reservation"]
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
    _audit_clean(rt, company, [job_id])


@pytest.mark.postgres
@pytest.mark.redis
def test_cancel_while_comfyui_renders_interrupts_the_prompt_and_refunds(
        api_stack, start_worker):
    server = FakeComfyUI().start()
    server.config["hold"] = True  # a prompt runs until it is interrupted
    graph = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 7}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": "caller"}},
    }
    try:
        env, rt, client, company = api_stack(CREDITS, COMFY_WORKER_URL=server.url,
                                             POLL_INTERVAL_SECONDS="0.1")
        start_worker(env, queues=["pipeline"], concurrency=2)
        start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="threads")
        job_id = _submit(client, company.api_key, {
            "contentType": "image", "prompt": "a lighthouse", "provider": "comfyui",
            "settings": {"workflow": graph}})
        wait_for(lambda: server.running is not None, timeout=30, message="the prompt to run")
        resp = _cancel(client, company.api_key, job_id)
        assert resp.status_code == 200, resp.get_json()
        _assert_cancelled(resp.get_json())
        wait_for(lambda: server.interrupted, timeout=15, message="ComfyUI's /interrupt")
        wait_for(lambda: server.running is None, timeout=10, message="the prompt to stop")
    finally:
        server.config["hold"] = False
        server.stop()
    job = _job(rt, job_id)
    assert job.status == "cancelled"
    # Our own GPUs: a hold only where the price table gives ComfyUI a price.
    expected = ["refund", "reservation"] if job.estimated_cost else []
    assert _entries(rt, job_id) == expected
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
    _audit_clean(rt, company, [job_id])


@pytest.mark.postgres
def test_cancel_racing_completion_moves_money_once(pg_runtime):
    """Cancel and the generate step's finish (output, store, settle) run at once, many
    times: each job is either cancelled and refunded or completed and charged, never both,
    and the cancel is refused exactly when the job completed."""
    rt = pg_runtime
    company = make_company(rt.engine, credits=CREDITS, name="racer")
    principal = Principal(company.company_id, company.user_id, None)
    settings = {"width": 100, "height": 100}
    job_ids = []
    for _ in range(20):
        job_id = submit_job(rt.engine, rt.registry, principal=principal,
                            req=JobRequest("image", "a square", settings),
                            max_prompt_length=4000)["id"]
        assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=3600)
        assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
        job_ids.append(job_id)
    output = LocalProvider().start(GenerationRequest("x", "image", "a square", settings))

    refused = {}

    def finish(job_id, go):
        go.wait()
        with rt.engine.connect() as conn:
            job = get_job(conn, job_id)
        lifecycle.save_output(rt.engine, rt.storage, job, output)
        lifecycle.store(rt.engine, rt.storage, job_id)
        lifecycle.settle(rt.engine, job_id)

    def cancel(job_id, go):
        go.wait()
        try:
            cancel_job(rt.engine, job_id, company.company_id, by="test")
            refused[job_id] = False
        except JobAlreadyFinished:
            refused[job_id] = True

    for job_id in job_ids:
        go = threading.Event()
        threads = [threading.Thread(target=finish, args=(job_id, go)),
                   threading.Thread(target=cancel, args=(job_id, go))]
        for thread in threads:
            thread.start()
        go.set()
        for thread in threads:
            thread.join(30)

    for job_id in job_ids:
        job, entries = _job(rt, job_id), _entries(rt, job_id)
        if job.status == "completed":
            assert refused[job_id]
            assert entries in (["debit", "release", "reservation"], ["debit", "reservation"])
        else:
            assert (job.status, refused[job_id]) == ("cancelled", False)
            assert entries == ["refund", "reservation"]
            assert job.actual_cost is None
    spent = sum((_job(rt, j).actual_cost or Decimal(0)) for j in job_ids)
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS - spent
    _audit_clean(rt, company, job_ids)


def test_cancel_on_the_embedded_database_refunds_and_refuses_a_second_time(tmp_path):
    """SQLite has no row locks or FOR UPDATE: the compare-and-set alone decides there."""
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"),
        "DATABASE_URL": f"sqlite:///{tmp_path}/cancel.db", "SECRET_KEY": "k",
        "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env")})
    rt = build_runtime(settings)
    init_db(rt.engine)
    try:
        company = make_company(rt.engine, credits=CREDITS)
        job_id = submit_job(rt.engine, rt.registry,
                            principal=Principal(company.company_id, company.user_id, None),
                            req=JobRequest("image", "a square", {"width": 100, "height": 100}),
                            max_prompt_length=4000)["id"]
        assert lifecycle.reserve(rt.engine, job_id, ttl_seconds=3600)
        with pytest.raises(NotFound):
            cancel_job(rt.engine, job_id, uuid.uuid4(), by="someone else")
        job = cancel_job(rt.engine, job_id, company.company_id, by="API key k1")
        assert (job.status, job.error_code) == ("cancelled", "CANCELLED")
        assert job.error.startswith("Cancelled by API key k1 at ")
        with pytest.raises(JobAlreadyFinished):
            cancel_job(rt.engine, job_id, company.company_id, by="API key k1")
        assert not lifecycle.reserve(rt.engine, job_id, ttl_seconds=3600)
        assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is None
        assert _entries(rt, job_id) == ["refund", "reservation"]
        assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
        _audit_clean(rt, company, [job_id])
    finally:
        rt.engine.dispose()
