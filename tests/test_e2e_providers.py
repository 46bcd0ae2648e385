"""Jobs through real workers against fake servers that speak each provider's HTTP contract."""

from __future__ import annotations

import os
import signal
import threading
import time
from decimal import Decimal

import pytest
import redis
import requests
from sqlalchemy import select, text

from api import create_app
from pipeline import provider_keys
from pipeline.tables import job_attempts, job_dispatches
from service.stack import free_port
from tasks.chain import build_chain
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    make_company,
    wait_for,
    wait_terminal,
    wallet_of,
)
from tests.conftest import REDIS_URL, distributed_env, runtime_for
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.fakes.heygen import FakeHeyGen
from tests.fakes.openai import FakeOpenAI
from tests.fakes.runway import FakeRunway
from tests.fakes.stability import FakeStability

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

KEYS = {
    "openai": "sk-platform-openai-5f1c9e2b7a",
    "runway": "key_platform-runway-83d0aa1c",
    "heygen": "hg-platform-heygen-44e1b0d9",
    "stability": "sk-company-stability-9c2e71f0",    # set as the company's own key
    "elevenlabs": "xi-company-elevenlabs-1b7d55aa",  # set as the company's own key
}


@pytest.fixture(scope="module")
def fakes():
    servers = {
        "openai": FakeOpenAI(api_key=KEYS["openai"]),
        "stability": FakeStability(api_key=KEYS["stability"]),
        "elevenlabs": FakeElevenLabs(api_key=KEYS["elevenlabs"]),
        "runway": FakeRunway(api_key=KEYS["runway"]),
        "heygen": FakeHeyGen(api_key=KEYS["heygen"]),
        "comfyui": FakeComfyUI(),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def stack(pg_database, redis_prefix, fakes, tmp_path):
    """Env for workers and a runtime + client for the test, all pointed at the fakes."""
    env = distributed_env(
        tmp_path, pg_database, redis_prefix, storage_url=f"file://{tmp_path}/store",
        OPENAI_BASE_URL=f"{fakes['openai'].url}/v1", OPENAI_API_KEY=KEYS["openai"],
        STABILITY_BASE_URL=fakes["stability"].url,
        ELEVENLABS_BASE_URL=fakes["elevenlabs"].url,
        RUNWAY_BASE_URL=fakes["runway"].url, RUNWAY_API_KEY=KEYS["runway"],
        HEYGEN_BASE_URL=fakes["heygen"].url, HEYGEN_API_KEY=KEYS["heygen"],
        COMFY_WORKER_URL=fakes["comfyui"].url,
        PROVIDER_KEY_SECRETS="dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        POLL_INTERVAL_SECONDS="0.2", MAX_ATTEMPTS="2", ROUTE_IMAGE="stability,local",
    )
    rt = runtime_for(env)
    company = make_company(rt.engine, credits=1000)
    cipher = provider_keys.cipher(rt.settings.provider_key_secrets)
    for name in ("stability", "elevenlabs"):
        provider_keys.set_key(rt.engine, cipher, company.company_id, name, KEYS[name])
    yield env, rt, create_app(rt).test_client(), company
    rt.engine.dispose()


def _submit(client, company, content_type, provider=None, settings=None, *, prompt="a calm sea"):
    body = {"contentType": content_type, "prompt": prompt, "settings": settings or {}}
    if provider:
        body["provider"] = provider
    resp = client.post("/v1/jobs", headers=auth(company.api_key), json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


def _view(client, company, job_id):
    return client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()


def _attempts(rt, job_id):
    with rt.engine.connect() as conn:
        return [(r.provider, r.outcome) for r in conn.execute(
            select(job_attempts).where(job_attempts.c.job_id == job_id)
            .order_by(job_attempts.c.number))]


CASES = [
    ("openai", "text", {"maxTokens": 50}),
    ("openai", "image", {}),
    ("openai", "audio", {}),
    ("openai", "video", {"seconds": 4}),
    ("stability", "image", {}),
    ("elevenlabs", "audio", {}),
    ("runway", "video", {"duration": 5}),
    ("heygen", "video", {}),
    ("comfyui", "image", {"width": 512, "height": 512, "steps": 4}),
]


def test_every_provider_completes_through_real_workers(stack, start_worker):
    env, rt, client, company = stack
    start_worker(env)
    ids = {(p, c): _submit(client, company, c, p, s) for p, c, s in CASES}
    statuses = wait_terminal(rt.engine, list(ids.values()), timeout=120)
    failed = {k: _view(client, company, j)["error"] for k, j in ids.items()
              if statuses[j] != "completed"}
    assert not failed
    for (provider, _ctype), job_id in ids.items():
        view = _view(client, company, job_id)
        assert view["provider"] == provider
        assert view["progress"] == 1.0
        assert view["result"]["size"] > 0
        assert Decimal(view["actualCost"]) <= Decimal(view["estimatedCost"])
        assert _attempts(rt, job_id) == [(provider, "succeeded")]
    assert wallet_of(rt.engine, company.company_id).credits_held == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_refusals_fail_with_their_reason_and_refund(stack, start_worker, fakes):
    env, rt, client, company = stack
    fakes["stability"].push("generate", fakes["stability"].filtered())
    fakes["openai"].push("images", fakes["openai"].quota_exhausted())
    metrics_port = free_port()
    start_worker({**env, "WORKER_METRICS_PORT": str(metrics_port)})
    filtered = _submit(client, company, "image", "stability")
    quota = _submit(client, company, "image", "openai")
    wait_terminal(rt.engine, [filtered, quota])
    assert _view(client, company, filtered)["error"]["code"] == "CONTENT_FILTERED"
    assert _view(client, company, quota)["error"]["code"] == "PROVIDER_QUOTA_EXHAUSTED"
    wallet = wallet_of(rt.engine, company.company_id)
    assert (wallet.credits_held, wallet.credits_used) == (0, 0)
    assert wallet.credits_available == 1000
    # Operators are alerted through the worker's metrics: quota exhaustion is counted
    # per provider (the exporter binds loopback, so no token is needed here).
    exported = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    assert ('pipeline_provider_requests_total{code="PROVIDER_QUOTA_EXHAUSTED",'
            'operation="start",outcome="refused",provider="openai"} 1.0') in exported
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_transient_failures_fall_back_to_the_next_provider(stack, start_worker, fakes):
    env, rt, client, company = stack
    unavailable = fakes["stability"].error(503, "server_error", "try later")
    fakes["stability"].push("generate", *[unavailable] * 2)
    start_worker(env)
    job_id = _submit(client, company, "image", settings={"width": 128, "height": 128})
    assert wait_terminal(rt.engine, [job_id], timeout=90)[job_id] == "completed"
    view = _view(client, company, job_id)
    assert view["provider"] == "local"
    assert _attempts(rt, job_id) == [("stability", "transient"), ("stability", "transient"),
                                     ("local", "succeeded")]
    assert Decimal(view["actualCost"]) < Decimal(view["estimatedCost"])  # held at stability's
    with rt.engine.connect() as conn:  # a re-drive by the sweeper goes to the new queue
        queue = conn.execute(select(job_dispatches.c.queue)
                             .where(job_dispatches.c.job_id == job_id)).scalar_one()
    assert queue == "local"
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_no_provider_key_appears_anywhere(stack, start_worker, fakes, redis_prefix):
    env, rt, client, company = stack
    worker = start_worker(env)
    ids = [_submit(client, company, c, p, s) for p, c, s in CASES[:7]]
    fakes["openai"].push("chat", fakes["openai"].error(401, "invalid_api_key", "bad key"))
    ids.append(_submit(client, company, "text", "openai"))
    wait_terminal(rt.engine, ids, timeout=120)

    # A chain waiting in the broker, as Flower or redis-cli would show it.
    idle_queue = "saas.unconsumed-test"
    waiting = build_chain(rt.publisher.app, ids[0], idle_queue)
    waiting.tasks[0].set(queue=idle_queue, routing_key=idle_queue)
    waiting.apply_async()
    r = redis.Redis.from_url(REDIS_URL)
    messages = b"".join(r.lrange(f"{redis_prefix}{idle_queue}", 0, -1))
    assert ids[0].encode() in messages
    r.delete(f"{redis_prefix}{idle_queue}")

    with rt.engine.connect() as conn:
        dumps = [conn.execute(text(f"SELECT CAST(t AS TEXT) FROM {table} t")).scalars().all()
                 for table in ("jobs", "logs", "api_usage", "job_attempts", "transactions",
                               "media_assets", "provider_keys", "metrics")]
    responses = [client.get(f"/v1/jobs/{j}", headers=auth(company.api_key)).get_data(True)
                 for j in ids]
    responses.append(client.get("/v1/provider-keys", headers=auth(company.admin_key))
                     .get_data(True))
    haystack = "\n".join([worker.log(), messages.decode(errors="replace"), *responses,
                          *(row for rows in dumps for row in rows)])
    for name, key in KEYS.items():
        assert key not in haystack, f"{name} key leaked"


def test_gpu_worker_runs_one_job_at_a_time_per_instance(stack, start_worker, fakes):
    env, rt, client, company = stack
    comfy = fakes["comfyui"]
    comfy.config["run_seconds"] = 1.0
    depth, progress, stop = [], set(), threading.Event()
    ids: list[str] = []

    def sample():
        while not stop.is_set():
            depth.append(len(comfy.pending) + (comfy.running is not None))
            if ids:  # what a client polling GET /v1/jobs/<id> sees while the GPU works
                progress.update(_view(client, company, j)["progress"] for j in list(ids))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_worker(env, queues=["pipeline"], concurrency=2)
    start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="prefork")
    ids.extend(_submit(client, company, "image", "comfyui", {"seed": n}) for n in range(3))
    statuses = wait_terminal(rt.engine, ids, timeout=90)
    stop.set()
    sampler.join()
    comfy.config["run_seconds"] = 0.02
    assert set(statuses.values()) == {"completed"}
    assert max(depth) == 1  # never a second prompt queued behind a running one
    assert any(p is not None and 0 < p < 1 for p in progress)  # from ComfyUI's websocket


def test_comfyui_job_is_not_submitted_twice_after_its_worker_dies(stack, start_worker, fakes):
    env, rt, client, company = stack
    comfy = fakes["comfyui"]
    env = {**env, "STALE_AFTER_SECONDS": "3", "SWEEP_INTERVAL_SECONDS": "1"}
    comfy.config["paused"] = True  # the prompt stays queued while we kill the worker
    before = len(comfy.received("prompt"))
    start_worker(env, queues=["pipeline", "maintenance"], concurrency=2, beat=True)
    gpu = start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="prefork")
    job_id = _submit(client, company, "image", "comfyui")
    wait_for(lambda: len(comfy.received("prompt")) == before + 1, timeout=30)
    os.killpg(gpu.proc.pid, signal.SIGKILL)
    gpu.proc.wait()
    comfy.config["paused"] = False
    start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="prefork")
    assert wait_terminal(rt.engine, [job_id], timeout=60)[job_id] == "completed"
    assert len(comfy.received("prompt")) == before + 1
    assert_wallet_matches_ledger(rt.engine, company.company_id)
