"""The generate step through real workers against fakes that behave like the real servers:
jobs that poll for a long time, calls slower than the staleness window, workers killed
mid-call, an object store that fails after the vendor was paid."""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select

from pipeline.tables import job_attempts
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    job_row,
    ledger_entries,
    wait_for,
    wait_terminal,
    wallet_of,
)
from tests.fakes.heygen import FakeHeyGen
from tests.fakes.openai import FakeOpenAI
from tests.fakes.runway import FakeRunway
from tests.fakes.s3_faults import S3FaultProxy

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

KEY = "sk-platform-key-for-generation-tests"
CREDITS = 1000


@pytest.fixture(scope="module")
def fakes():
    servers = {"openai": FakeOpenAI(api_key=KEY), "runway": FakeRunway(api_key=KEY),
               "heygen": FakeHeyGen(api_key=KEY)}
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def stack(fakes, api_stack):
    """stack(**env) -> (env, runtime, API client, company), all pointed at the fakes."""

    def make(**extra):
        return api_stack(
            CREDITS, OPENAI_BASE_URL=f"{fakes['openai'].url}/v1", OPENAI_API_KEY=KEY,
            RUNWAY_BASE_URL=fakes["runway"].url, RUNWAY_API_KEY=KEY,
            HEYGEN_BASE_URL=fakes["heygen"].url, HEYGEN_API_KEY=KEY,
            POLL_INTERVAL_SECONDS="0.05", **extra)

    return make


def _submit(client, company, content_type, provider, settings=None):
    body = {"contentType": content_type, "prompt": "a calm sea", "provider": provider,
            "settings": settings or {}}
    resp = client.post("/v1/jobs", headers=auth(company.api_key), json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


def _job(rt, job_id):
    return job_row(rt.engine, job_id)


def _entries(rt, job_id):
    return ledger_entries(rt.engine, job_id)


# provider, settings, the fake's submit route, its poll route, its cancel route (None: the
# vendor documents no way to stop a render)
LONG = [
    ("runway", {"duration": 5}, "submit", "task", "delete"),
    ("heygen", {}, "generate", "status", None),
    ("openai", {"seconds": 4}, "video_create", "video_get", "video_delete"),
]


@pytest.mark.parametrize("case", LONG, ids=[case[0] for case in LONG])
def test_a_video_that_takes_sixty_polls_starts_once_and_is_charged_once(
        case, fakes, stack, start_worker):
    provider, settings, submit, poll, _ = case
    fake = fakes[provider]
    env, rt, client, company = stack()
    fake.config["polls_to_finish"] = 65
    submits, polls = len(fake.received(submit)), len(fake.received(poll))
    try:
        start_worker(env, concurrency=4)
        job_id = _submit(client, company, "video", provider, settings)
        assert wait_terminal(rt.engine, [job_id], timeout=120)[job_id] == "completed"
    finally:
        fake.config["polls_to_finish"] = fake.defaults["polls_to_finish"]
    assert len(fake.received(submit)) == submits + 1  # one remote start
    assert len(fake.received(poll)) - polls >= 60
    job = _job(rt, job_id)
    assert job.attempts == 1
    assert _entries(rt, job_id).count("debit") == 1
    assert "refund" not in _entries(rt, job_id)
    assert_wallet_matches_ledger(rt.engine, company.company_id)


@pytest.mark.parametrize("case", LONG, ids=[case[0] for case in LONG])
def test_a_video_that_never_finishes_fails_at_its_deadline_refunded_and_cancelled(
        case, fakes, stack, start_worker):
    provider, settings, _, _, cancel = case
    fake = fakes[provider]
    env, rt, client, company = stack(**{f"{provider.upper()}_DEADLINE_SECONDS": "3"})
    fake.config["polls_to_finish"] = 10**9
    cancels = len(fake.received(cancel)) if cancel else 0
    try:
        start_worker(env, concurrency=4)
        job_id = _submit(client, company, "video", provider, settings)
        assert wait_terminal(rt.engine, [job_id], timeout=60)[job_id] == "failed"
    finally:
        fake.config["polls_to_finish"] = fake.defaults["polls_to_finish"]
    view = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()
    assert view["error"]["code"] == "PROVIDER_TIMEOUT"
    assert "3 s" in view["error"]["message"]
    assert _entries(rt, job_id) == ["refund", "reservation"]
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
    if cancel:
        assert len(fake.received(cancel)) == cancels + 1
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_a_thirty_second_call_is_started_once_though_staleness_is_ten_seconds(
        fakes, stack, start_worker):
    openai = fakes["openai"]
    env, rt, client, company = stack(STALE_AFTER_SECONDS="10", REQUEUE_AFTER_SECONDS="10",
                                     SWEEP_INTERVAL_SECONDS="1")
    calls = len(openai.received("chat"))
    openai.push("chat", openai.slow(30))
    start_worker(env, concurrency=4, beat=True)
    job_id = _submit(client, company, "text", "openai", {"maxTokens": 20})
    assert wait_terminal(rt.engine, [job_id], timeout=90)[job_id] == "completed"
    assert len(openai.received("chat")) == calls + 1
    assert _job(rt, job_id).attempts == 1
    assert _entries(rt, job_id).count("debit") == 1
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_a_worker_killed_mid_call_is_redriven_within_a_minute_and_completes_once(
        fakes, stack, start_worker):
    openai = fakes["openai"]
    env, rt, client, company = stack(SWEEP_INTERVAL_SECONDS="1")
    calls = len(openai.received("chat"))
    openai.push("chat", openai.slow(20))
    start_worker(env, queues=["pipeline", "maintenance"], concurrency=2, beat=True)
    saas = start_worker(env, queues=["saas.openai"], concurrency=1, pool="prefork")
    job_id = _submit(client, company, "text", "openai", {"maxTokens": 20})
    wait_for(lambda: len(openai.received("chat")) == calls + 1, timeout=30)
    os.killpg(saas.proc.pid, signal.SIGKILL)
    saas.proc.wait()
    killed_at = time.monotonic()
    start_worker(env, queues=["saas.openai"], concurrency=1, pool="prefork")
    assert wait_terminal(rt.engine, [job_id], timeout=120)[job_id] == "completed"
    assert time.monotonic() - killed_at < 90  # the default staleness is 60 s
    assert len(openai.received("chat")) == calls + 2  # the killed call, then the re-drive
    with rt.engine.connect() as conn:
        outcomes = [r.outcome for r in conn.execute(
            select(job_attempts.c.outcome).where(job_attempts.c.job_id == job_id)
            .order_by(job_attempts.c.number))]
    assert outcomes == [None, "succeeded"]  # the first died with its worker
    assert _entries(rt, job_id).count("debit") == 1
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_an_output_is_retried_into_storage_and_never_requested_again(
        fakes, stack, start_worker, s3_server):
    openai = fakes["openai"]
    with S3FaultProxy(s3_server) as proxy:
        env, rt, client, company = stack(STORAGE_URL="s3://generation-faults/out",
                                         S3_ENDPOINT_URL=proxy.url)
        rt.storage.ensure_bucket()
        calls = len(openai.received("images"))
        proxy.fail_puts(9)  # past boto3's own retries, twice over
        start_worker(env, concurrency=4)
        job_id = _submit(client, company, "image", "openai")
        assert wait_terminal(rt.engine, [job_id], timeout=120)[job_id] == "completed"
        assert proxy.counts()["failed_puts"] == 9
    assert len(openai.received("images")) == calls + 1
    view = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()
    assert view["result"]["size"] > 0
    assert _entries(rt, job_id).count("debit") == 1
    assert_wallet_matches_ledger(rt.engine, company.company_id)
