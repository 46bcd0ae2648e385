"""The publish bound: a broker that accepts connections and never answers costs a submit at
most PUBLISH_TIMEOUT_SECONDS; the job waits in the outbox and runs once the broker answers.

The broker sits behind a TCP proxy that can go silent: held, it accepts connections and
answers nothing, as a stopped (SIGSTOP) Redis or RabbitMQ does, or a black hole on the path.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from urllib.parse import urlsplit

import pytest

from api import create_app
from pipeline.config import Settings
from tasks.app import create_celery
from tasks.chain import CeleryPublisher
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    make_company,
    wait_for,
    wallet_of,
)
from tests.conftest import REDIS_URL, distributed_env, runtime_for
from tests.fakes.tcp_proxy import TcpProxy

BOUND = 1.0  # PUBLISH_TIMEOUT_SECONDS in these tests
MARGIN = 1.5  # the request's own work (two short transactions) on a loaded machine
JOB = {"contentType": "text", "prompt": "hi", "providerName": "local"}


def timed_submit(client, key: str):
    started = time.monotonic()
    resp = client.post("/v1/jobs", headers=auth(key), json=JOB)
    return resp, time.monotonic() - started


def submit_until_queued(client, key: str, job_ids: list[str]) -> None:
    """Submit until one publishes: the broker answers again, and so does the publisher."""

    def queued():
        resp, _ = timed_submit(client, key)
        assert resp.status_code == 202, resp.get_json()
        job_ids.append(resp.get_json()["jobId"])
        return resp.get_json()["status"] == "queued"

    wait_for(queued, timeout=15, interval=0.2, message="a submit to publish its chain")


def assert_pending_within_bound(resp, elapsed: float) -> str:
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["status"] == "pending"
    assert elapsed <= BOUND + MARGIN, f"submit took {elapsed:.2f}s against a hung broker"
    return resp.get_json()["jobId"]


@pytest.fixture
def redis_proxy():
    """A proxy to the tests' Redis, held until the test says otherwise."""
    redis_url = urlsplit(REDIS_URL)
    with TcpProxy((redis_url.hostname, redis_url.port or 6379)) as proxy:
        yield proxy


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_a_hung_redis_costs_a_submit_the_bound_and_the_jobs_run_once_it_answers(
        empty_pg_database, own_redis_prefix, redis_proxy, start_worker, tmp_path):
    # A database of the test's own: the worker's beat sweeps all of it.
    env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store",
                          CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_proxy.port}/0",
                          PUBLISH_TIMEOUT_SECONDS=BOUND, DISPATCH_GRACE_SECONDS=1,
                          SWEEP_INTERVAL_SECONDS=1)
    rt = runtime_for(env)
    client = create_app(rt).test_client()
    company = make_company(rt.engine, credits=5)

    # Hung at the handshake: the connection is accepted, the first command never answered.
    ids = [assert_pending_within_bound(*timed_submit(client, company.api_key))]

    redis_proxy.forward()
    submit_until_queued(client, company.api_key, ids)

    # Hung mid-stream: the publisher's pooled connection stops being answered.
    redis_proxy.hold()
    ids.append(assert_pending_within_bound(*timed_submit(client, company.api_key)))

    redis_proxy.forward()
    # Straight to Redis: beat's sweep relays the outbox once DISPATCH_GRACE_SECONDS pass.
    start_worker({**env, "CELERY_BROKER_URL": REDIS_URL}, beat=True)

    def completed():
        views = [client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()
                 for job_id in ids]
        return all(v["status"] == "completed" for v in views) and views

    views = wait_for(completed, timeout=60, interval=0.5, message="every job to complete")
    # A publish that went through after its caller gave up is a second chain; the steps
    # skip it, so each job is charged once.
    wallet = wallet_of(rt.engine, company.company_id)
    assert wallet.credits_used == sum(Decimal(v["actualCost"]) for v in views)
    assert wallet.credits_held == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    rt.engine.dispose()


@pytest.mark.postgres
def test_a_hung_rabbitmq_costs_a_submit_the_bound(api_stack, rabbitmq_url):
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    with TcpProxy(("127.0.0.1", 5672)) as proxy:
        _env, _rt, client, company = api_stack(
            5, CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}",
            PUBLISH_TIMEOUT_SECONDS=BOUND)

        # Hung before Connection.Start: connect is accepted, the handshake never begins.
        assert_pending_within_bound(*timed_submit(client, company.api_key))

        proxy.forward()
        submit_until_queued(client, company.api_key, [])

        # Hung mid-stream: a write still fits the socket buffer, but the broker never
        # confirms it, so the job waits in the outbox instead of counting as queued.
        proxy.hold()
        assert_pending_within_bound(*timed_submit(client, company.api_key))
        proxy.forward()  # lets the stuck publish finish before the vhost goes


@pytest.mark.redis
def test_publishes_waiting_on_a_hung_broker_are_capped_and_recover(redis_proxy,
                                                                   own_redis_prefix,
                                                                   tmp_path):
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"), "SECRET_KEY": "k",
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_proxy.port}/0",
        "CELERY_BROKER_KEY_PREFIX": own_redis_prefix, "PUBLISH_TIMEOUT_SECONDS": str(BOUND)})
    publisher = CeleryPublisher(create_celery(settings), max_in_flight=2)
    job_id = "00000000-0000-4000-8000-000000000000"  # no worker reads these queues
    callers = threading.Barrier(5)

    def publishing_threads() -> int:
        return sum(t.name.startswith("broker-publish") for t in threading.enumerate())

    def publish(_) -> float:
        callers.wait()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            publisher.publish(job_id, "local")
        return time.monotonic() - started

    # Five requests at once against two publishing threads: each gives up within the
    # bound, waiting for a thread included, and no third thread gets stuck on the broker.
    before = publishing_threads()  # other tests' publishers may have some left
    with ThreadPoolExecutor(5) as requests:
        waits = list(requests.map(publish, range(5)))
        added = publishing_threads() - before
    assert all(w <= BOUND + MARGIN for w in waits), waits
    assert added <= 2

    redis_proxy.forward()

    def published():
        try:
            publisher.publish(job_id, "local")
        except TimeoutError:
            return False
        return True

    wait_for(published, timeout=10, interval=0.2, message="a publish once Redis answers")
