"""End to end through real Celery workers: PostgreSQL + Redis + S3 (moto), and embedded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest
import requests
from celery import chain

from api import create_app
from pipeline import budgets
from pipeline.config import Settings
from pipeline.sweeper import sweep
from service.demo import check_file
from tasks import names
from tasks.app import create_celery
from tasks.chain import CeleryPublisher
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    job_statuses,
    make_company,
    wait_for,
    wait_terminal,
    wallet_of,
)
from tests.conftest import ROOT, distributed_env, runtime_for

pytestmark = pytest.mark.e2e

JOBS = {
    "text": ("a haiku about queues", {"maxTokens": 60}),
    "image": ("a lighthouse", {"width": 128, "height": 96}),
    "audio": ("Hello from the workers.", {}),
    "video": ("waves", {"duration": 1, "width": 160, "height": 120}),
}


@pytest.fixture
def distributed(pg_database, redis_prefix, s3_server, tmp_path):
    """Settings, runtime and API client for PostgreSQL + Redis + S3; no worker yet."""
    bucket = f"results-{tmp_path.name[-8:].lower().replace('_', '-')}"
    env = distributed_env(tmp_path, pg_database, redis_prefix,
                          storage_url=f"s3://{bucket}/jobs", s3_endpoint=s3_server)
    rt = runtime_for(env)
    rt.storage.ensure_bucket()
    yield env, rt, create_app(rt).test_client()
    rt.engine.dispose()


@pytest.mark.postgres
@pytest.mark.redis
def test_every_content_type_completes_on_postgres_redis_and_s3(distributed, start_worker):
    env, rt, client = distributed
    worker = start_worker(env)
    company = make_company(rt.engine, credits=20)
    ids = {}
    for ctype, (prompt, settings) in JOBS.items():
        resp = client.post("/v1/jobs", headers=auth(company.api_key),
                           json={"contentType": ctype, "prompt": prompt, "settings": settings})
        assert resp.status_code == 202, resp.get_json()
        ids[ctype] = resp.get_json()["jobId"]

    statuses = wait_terminal(rt.engine, list(ids.values()), timeout=120)
    assert set(statuses.values()) == {"completed"}, statuses

    spent = Decimal(0)
    for ctype, job_id in ids.items():
        view = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()
        data = requests.get(view["result"]["url"], timeout=30).content  # presigned S3 link
        assert check_file(ctype, data) is None, ctype
        assert len(data) == view["result"]["size"]
        assert Decimal(view["actualCost"]) <= Decimal(view["estimatedCost"])
        assert view["reservedAt"]
        assert view["storedAt"]
        assert view["settledAt"]
        spent += Decimal(view["actualCost"])
        if ctype == "text":
            assert view["preview"]
            assert view["preview"] in data.decode()
    wallet = wallet_of(rt.engine, company.company_id)
    assert wallet.credits_available == Decimal(20) - spent
    assert wallet.credits_held == 0
    assert wallet.credits_used == spent
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    # The local provider's jobs are stored and settled by their generate task: the hold
    # was taken at submit, so each job was one task, and no finish step was published.
    assert worker.log().count(f"{names.GENERATE}[") >= len(JOBS)
    assert f"{names.FINISH}[" not in worker.log()


@pytest.mark.postgres
@pytest.mark.redis
def test_broker_down_at_submit_still_accepts_and_runs_later(distributed, start_worker,
                                                            tmp_path):
    """The job row is committed before publishing; the outbox relay sends it later."""
    env, rt, client = distributed
    dead = Settings.from_env(environ={**env, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
                                      "PUBLISH_TIMEOUT_SECONDS": "0.5"})
    rt.publisher = CeleryPublisher(create_celery(dead))
    company = make_company(rt.engine, credits=5)
    resp = client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": "text", "prompt": "written while down"})
    assert resp.status_code == 202
    job_id = resp.get_json()["jobId"]
    assert resp.get_json()["status"] == "pending"
    assert job_statuses(rt.engine, [job_id])[job_id] == "pending"

    # The broker is back: beat's sweep relays the outbox once the grace period passes.
    rt.publisher = CeleryPublisher(create_celery(rt.settings))
    start_worker(env)
    def relayed():
        sweep(rt)  # what beat does every few seconds; other tests' rows may go first
        return job_statuses(rt.engine, [job_id])[job_id] != "pending"

    wait_for(relayed, timeout=30, interval=1, message="the relay to dispatch the job")
    assert wait_terminal(rt.engine, [job_id])[job_id] == "completed"
    assert_wallet_matches_ledger(rt.engine, company.company_id)


@pytest.mark.postgres
@pytest.mark.redis
def test_a_chain_published_before_the_finish_step_still_completes(distributed, start_worker):
    """Chains an earlier version published (store and settle as steps of their own) may
    still wait in the queues across an upgrade: today's workers run them to the end."""
    env, rt, client = distributed
    dead = Settings.from_env(environ={**env, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
                                      "PUBLISH_TIMEOUT_SECONDS": "0.5"})
    rt.publisher = CeleryPublisher(create_celery(dead))  # the job waits, unpublished
    company = make_company(rt.engine, credits=5)
    job_id = client.post("/v1/jobs", headers=auth(company.api_key),
                         json={"contentType": "text", "prompt": "from before"}
                         ).get_json()["jobId"]
    app = create_celery(rt.settings)
    steps = [(names.RESERVE, names.PIPELINE_QUEUE), (names.GENERATE, names.LOCAL_QUEUE),
             (names.STORE, names.PIPELINE_QUEUE), (names.SETTLE, names.PIPELINE_QUEUE)]
    chain(*(app.signature(name, args=(job_id,), immutable=True, queue=queue,
                          routing_key=queue) for name, queue in steps)).apply_async()
    worker = start_worker(env)
    assert wait_terminal(rt.engine, [job_id])[job_id] == "completed"
    for name, _queue in steps:
        assert f"{name}[" in worker.log()
    assert names.FINISH not in worker.log()
    view = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()
    assert Decimal(view["actualCost"]) > 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)


@pytest.mark.postgres
@pytest.mark.redis
def test_job_that_cannot_be_reserved_fails_cleanly_and_charges_nothing(distributed,
                                                                       start_worker):
    """Two jobs pass the fast check, but the wallet covers only one hold. (A company with
    a budget: its holds are taken by the chain's reserve step, not by the submit.)"""
    env, rt, client = distributed
    company = make_company(rt.engine, credits="0.3")
    budgets.set_budget(rt.engine, company.company_id, period="day", cap="100")
    ids = [client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": "video", "prompt": "p",
                             "settings": {"duration": 4}}).get_json()["jobId"]
           for _ in range(2)]  # each estimate is 0.2: both pass the submit-time check
    start_worker(env)
    statuses = wait_terminal(rt.engine, ids, timeout=120)
    assert sorted(statuses.values()) == ["completed", "failed"]
    failed = next(j for j, s in statuses.items() if s == "failed")
    view = client.get(f"/v1/jobs/{failed}", headers=auth(company.api_key)).get_json()
    assert view["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert view["actualCost"] is None
    wallet = wallet_of(rt.engine, company.company_id)
    assert wallet.credits_available == Decimal("0.1")
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_a_second_job_the_held_wallet_cannot_cover_is_refused_at_submit(distributed,
                                                                          start_worker):
    """The submit holds the first job's credits, so the second sees what is left."""
    env, rt, client = distributed
    company = make_company(rt.engine, credits="0.3")
    answers = [client.post("/v1/jobs", headers=auth(company.api_key),
                           json={"contentType": "video", "prompt": "p",
                                 "settings": {"duration": 4}}) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 402]
    assert answers[1].get_json()["code"] == "INSUFFICIENT_CREDITS"
    start_worker(env)
    job_id = answers[0].get_json()["jobId"]
    assert wait_terminal(rt.engine, [job_id], timeout=120) == {job_id: "completed"}
    wallet = wallet_of(rt.engine, company.company_id)
    assert (wallet.credits_available, wallet.credits_held) == (Decimal("0.1"), 0)
    assert_wallet_matches_ledger(rt.engine, company.company_id)


@pytest.mark.postgres
def test_the_same_chain_runs_on_rabbitmq(pg_database, rabbitmq_url, start_worker, tmp_path):
    env = distributed_env(tmp_path, pg_database, "", storage_url=f"file://{tmp_path}/store")
    env["CELERY_BROKER_URL"] = rabbitmq_url
    rt = runtime_for(env)
    client = create_app(rt).test_client()
    start_worker(env)
    company = make_company(rt.engine, credits=5)
    ids = [client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": ctype, "prompt": JOBS[ctype][0],
                             "settings": JOBS[ctype][1]}).get_json()["jobId"]
           for ctype in ("text", "image")]
    assert set(wait_terminal(rt.engine, ids).values()) == {"completed"}
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    rt.engine.dispose()


def test_embedded_default_demo_runs_every_content_type(tmp_path):
    """`pipeline demo` with no services: SQLite, filesystem broker, local storage."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "STORAGE_URL", "SECRET_KEY",
                        "PUBLIC_URL", "S3_ENDPOINT_URL")}
    env.update({"PIPELINE_DATA_DIR": str(tmp_path / "var"),
                "PIPELINE_ENV_FILE": str(tmp_path / "no.env")})
    proc = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [j["status"] for j in report["jobs"]] == ["completed"] * 4
    assert all(j["problem"] is None and j["bytes"] > 0 for j in report["jobs"])
    assert Decimal(report["wallet"]["available"]) == Decimal(report["expectedAvailable"])
    assert (tmp_path / "var" / "pipeline.db").is_file()
