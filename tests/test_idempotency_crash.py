"""The API SIGKILLed during a burst of keyed submissions, restarted, and every request
retried with its key: each key answers with its job or makes it, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from sqlalchemy import func, select

from pipeline.tables import idempotency_keys, jobs
from service.stack import free_port
from tests.builders import auth, make_company, wait_for
from tests.conftest import ROOT, distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LEASE_SECONDS = 2
SUBMITTERS = 8


class Api:
    """gunicorn in its own process group, as production runs it."""

    def __init__(self, env: dict, port: int, log_path):
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--threads", "8", "--worker-class", "gthread", "api.wsgi:create()"],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for(self._up, timeout=60, message="the API did not start")

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:  # not listening yet, or its worker still booting
            return False

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        if not self._log.closed:
            self._log.close()


def _body(n: int) -> dict:
    return {"contentType": "text", "prompt": f"crash test {n}", "providerName": "local"}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_keys_survive_an_api_killed_mid_burst(backend, pg_database, own_redis_prefix, tmp_path):
    if backend == "postgresql":
        env = distributed_env(tmp_path, pg_database, own_redis_prefix,
                              storage_url=f"file://{tmp_path}/store",
                              IDEMPOTENCY_LEASE_SECONDS=LEASE_SECONDS)
    else:  # the embedded default: SQLite and the filesystem broker in one data folder
        env = {"PIPELINE_DATA_DIR": str(tmp_path / "var"),
               "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
               "IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS)}
    rt = runtime_for(env)
    company = make_company(rt.engine, credits=1000)
    headers = auth(company.api_key)
    port = free_port()
    sent: dict[str, int] = {}  # key -> request number
    first_answers: dict[str, str] = {}  # key -> jobId, for the requests that got an answer
    # A kill can land when no request sits between its claim and its commit (on SQLite
    # one time in three to two here, more on a loaded machine: all five bursts missed once
    # in a parallel CI run): burst and kill again until a key was left in flight.
    for burst in range(12):
        api = Api(env, port, tmp_path / f"api-burst-{burst}.log")
        _burst_and_kill(api, headers, f"b{burst}", sent, first_answers)
        with rt.engine.connect() as conn:
            stuck = conn.execute(select(func.count()).select_from(idempotency_keys).where(
                idempotency_keys.c.company_id == company.company_id,
                idempotency_keys.c.status == "in_flight")).scalar_one()
        if stuck:
            break
    assert stuck, "no kill left a key in flight"
    unanswered = set(sent) - set(first_answers)

    api = Api(env, port, tmp_path / "api-2.log")
    try:
        time.sleep(LEASE_SECONDS + 0.5)  # every claim the dead process held has lapsed
        answers = {}
        for key, number in sent.items():
            resp = requests.post(f"{api.url}/v1/jobs", json=_body(number), timeout=10,
                                 headers={**headers, "Idempotency-Key": key})
            assert resp.status_code == 202, (key, resp.status_code, resp.text)
            answers[key] = resp.json()["jobId"]
    finally:
        api.stop()

    # The keys answered before the kill give the same job back.
    assert {k: answers[k] for k in first_answers} == first_answers
    # One job per key, none without a key: a key pointed at its job or at nothing.
    assert len(set(answers.values())) == len(sent)
    with rt.engine.connect() as conn:
        made = set(conn.scalars(select(jobs.c.id).where(jobs.c.company_id == company.company_id)))
    assert {str(j) for j in made} == set(answers.values())
    print(f"{len(sent)} keys, {len(unanswered)} unanswered at the kill, {stuck} left in flight")
    rt.engine.dispose()


def _burst_and_kill(api: Api, headers: dict, tag: str, sent: dict, first_answers: dict):
    """SUBMITTERS threads send keyed submissions until the API is SIGKILLed under them."""
    lock, stop, answered = threading.Lock(), threading.Event(), []

    def submitter(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key, number = f"crash-{tag}-{worker}-{n}", worker * 10_000 + n
            with lock:
                sent[key] = number
            try:
                resp = requests.post(f"{api.url}/v1/jobs", json=_body(number), timeout=10,
                                     headers={**headers, "Idempotency-Key": key})
            except requests.RequestException:
                return  # the API died under this request
            if resp.status_code == 202:
                with lock:
                    first_answers[key] = resp.json()["jobId"]
                    answered.append(key)

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answered) >= 40, timeout=60, message="the burst never got going")
    api.kill()
    stop.set()
    for thread in threads:
        thread.join(15)

