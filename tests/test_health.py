"""/healthz, /readyz and `pipeline status` against real servers: a database that is not
there, a Redis of the test's own stopped and started again, a real worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from api import create_app
from pipeline import jobs as jobs_uc
from pipeline import status
from pipeline.config import Settings
from pipeline.jobs import JobRequest, Principal, submit_job
from service.runtime import build_runtime
from tasks.app import create_celery
from tasks.chain import CeleryPublisher
from tasks.probe import BrokerProbe
from tests.builders import make_company, wait_for
from tests.conftest import ROOT, distributed_env, runtime_for

NO_DATABASE = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens on port 1


def _client(rt):
    return create_app(rt).test_client()


def _submit(rt, company):
    return submit_job(rt.engine, rt.registry,
                      principal=Principal(company.company_id, company.user_id, None),
                      req=JobRequest("text", "a short poem", {}), max_prompt_length=4000)


@pytest.mark.redis
def test_healthz_answers_without_io_and_readyz_names_the_database_that_is_down(tmp_path):
    settings = Settings.from_env(environ=distributed_env(
        tmp_path, NO_DATABASE, "", storage_url=f"file://{tmp_path}/store"))
    rt = build_runtime(settings, publisher=CeleryPublisher(create_celery(settings)))
    client = _client(rt)

    live = client.get("/healthz")
    assert (live.status_code, live.get_json()) == (200, {"status": "ok"})

    ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is False
    assert body["checks"]["database"]["error"] == "OperationalError"
    assert body["checks"]["broker"]["ok"] is True  # the shared Redis is up
    assert "127.0.0.1" not in ready.get_data(as_text=True)  # no addresses in a public body


@pytest.mark.postgres
@pytest.mark.redis
def test_readyz_is_503_while_redis_is_stopped_and_200_once_it_is_back(pg_database, own_redis,
                                                                       tmp_path):
    env = distributed_env(tmp_path, pg_database, "", storage_url=f"file://{tmp_path}/store",
                          CELERY_BROKER_URL=own_redis.url, PUBLISH_TIMEOUT_SECONDS=1)
    rt = runtime_for(env)
    client = _client(rt)

    def readyz():
        started = time.monotonic()
        resp = client.get("/readyz")
        return resp.status_code, resp.get_json(), time.monotonic() - started

    code, body, _ = readyz()
    assert code == 200, body
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True, "broker": True}
    assert all(check["ms"] >= 0 for check in body["checks"].values())

    # Stopped: the port still accepts connections, and nothing answers on them.
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        code, body, took = readyz()
        assert code == 503, body
        assert body["status"] == "unavailable"
        assert body["checks"]["database"]["ok"] is True
        assert body["checks"]["broker"]["ok"] is False
        assert took < 3  # bounded by PUBLISH_TIMEOUT_SECONDS, not by a socket's defaults
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    wait_for(lambda: readyz()[0] == 200, timeout=10, message="/readyz after SIGCONT")

    # Gone: connections are refused at once.
    own_redis.kill()
    code, body, took = readyz()
    assert (code, body["checks"]["broker"]["ok"]) == (503, False)
    assert took < 3
    own_redis.start()  # the same port
    code, body, _ = readyz()
    assert code == 200, body
    rt.engine.dispose()


def test_readyz_in_the_embedded_mode_checks_the_broker_folder(tmp_path):
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path / "var"),
                                          "PIPELINE_ENV_FILE": str(tmp_path / "no.env")})
    rt = build_runtime(settings, publisher=CeleryPublisher(create_celery(settings)))
    from pipeline.db import init_db

    init_db(rt.engine)
    client = _client(rt)
    assert client.get("/readyz").status_code == 200

    folder = tmp_path / "var" / "broker" / "queue"
    folder.rename(folder.with_name("moved"))
    folder.write_text("not a folder")  # root may write anywhere; nobody writes into a file
    body = client.get("/readyz").get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"] == {"ok": False, "error": "NotADirectoryError",
                                        "ms": body["checks"]["broker"]["ms"]}
    folder.unlink()
    folder.with_name("moved").rename(folder)
    assert client.get("/readyz").status_code == 200

    # `pipeline status` there: depths from the folder, and no remote control to ask.
    company = make_company(rt.engine)
    job = _submit(rt, company)
    assert jobs_uc.dispatch(rt.engine, rt.publisher, job["id"], "local")
    data = status.report(rt.engine, BrokerProbe(create_celery(settings)), timeout=2)
    assert data["broker"]["queues"]["pipeline"] == 1  # the chain's first step waits there
    assert data["broker"]["workers"] is None
    assert "no remote control" in data["broker"]["workersNote"]
    assert data["jobs"]["queued"] == 1
    rt.engine.dispose()


# --- pipeline status ----------------------------------------------------------------------


def _status(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "status", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.e2e
def test_pipeline_status_against_a_real_worker(empty_pg_database, own_redis_prefix, tmp_path,
                                               start_worker):
    env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store")
    rt = runtime_for(env)
    company = make_company(rt.engine, credits=10)
    # The worker takes the `pipeline` queue only: each chain's hold is taken, and its
    # generate step then waits in the `local` queue.
    worker = start_worker(env, queues=["pipeline"], concurrency=2)
    queued = [_submit(rt, company) for _ in range(3)]
    for job in queued:
        assert jobs_uc.dispatch(rt.engine, rt.publisher, job["id"], "local")
    unsent = _submit(rt, company)  # its publish never happened: the outbox holds it

    seen = []

    def settled():
        run = _status(env, "--json")
        seen.append(run.stdout or run.stderr)
        data = json.loads(run.stdout)
        return data if data["openHolds"]["count"] == 3 and \
            data["broker"]["queues"]["local"] == 3 else None

    try:
        data = wait_for(settled, timeout=60, interval=1, message="three holds and messages")
    except AssertionError:
        pytest.fail(f"`pipeline status` never saw them; last:\n{seen[-1]}\n{worker.log()}")
    broker = data["broker"]
    assert (broker["kind"], broker["ok"]) == ("redis", True)
    assert broker["queues"]["pipeline"] == 0
    assert [name.partition("@")[0] for name in broker["workers"]] == [worker.name]
    assert data["jobs"] == {"pending": 1, "queued": 3, "processing": 0}
    oldest = data["oldestPendingJob"]
    assert oldest["jobId"] == str(queued[0]["id"])
    assert oldest["ageSeconds"] >= 0
    estimate = queued[0]["estimated_cost"]
    assert data["openHolds"]["credits"] == str(3 * estimate)
    assert data["outbox"]["unsent"] == 1
    assert data["outbox"]["oldestAgeSeconds"] >= 0
    assert str(unsent["id"]) not in json.dumps(broker)

    table = _status(env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(line.split() == ["queue", "local", "3"] for line in lines), table.stdout
    assert any(line.startswith("workers") and worker.name in line for line in lines)
    assert any(line.split()[:3] == ["outbox", "1", "unsent,"] for line in lines)

    down = _status({**env, "DATABASE_URL": NO_DATABASE})
    assert down.returncode == 1
    assert down.stderr.startswith("error: the database cannot be used")
    assert "Traceback" not in down.stderr
    rt.engine.dispose()
