"""Flower as `make flower` starts it: against the test broker, with authentication on, and
seeing job ids, never prompts or keys, in the tasks it lists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from api import create_app
from service.stack import free_port
from tests.builders import auth, make_company, stop_process_group, wait_for, wait_terminal
from tests.conftest import ROOT, distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.e2e]

LOGIN = ("operator", "flower-test-password")
PROMPT = "a lighthouse Flower must never show"


@pytest.fixture
def flower(tmp_path):
    """start(env) -> Flower's base URL; `pipeline flower` in a subprocess, stopped after."""
    procs = []

    def start(env: dict) -> str:
        port = free_port()
        log = open(tmp_path / "flower.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "flower", "--port", str(port)], cwd=ROOT,
            env={**os.environ, **env, "FLOWER_BASIC_AUTH": ":".join(LOGIN)}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}"

        def answers():
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                return requests.get(f"{url}/healthcheck", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(answers, timeout=60, message="Flower to answer")
        return url

    yield start
    for proc, log in procs:
        stop_process_group(proc)
        log.close()


def test_flower_lists_the_workers_behind_authentication(pg_database, own_redis_prefix,
                                                        tmp_path, start_worker, flower):
    env = distributed_env(tmp_path, pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store", TASK_EVENTS="1")
    rt = runtime_for(env)
    client = create_app(rt).test_client()
    worker = start_worker(env, name="flowertest")
    url = flower(env)

    assert requests.get(f"{url}/api/workers", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/workers", auth=("operator", "wrong"),
                        timeout=10).status_code == 401
    assert requests.get(f"{url}/", timeout=10).status_code == 401

    def listed():
        resp = requests.get(f"{url}/api/workers", params={"refresh": 1}, auth=LOGIN, timeout=15)
        assert resp.status_code == 200, resp.text
        return [name for name in resp.json() if name.startswith(f"{worker.name}@")]

    wait_for(listed, timeout=30, interval=1, message="Flower to list the test worker")

    company = make_company(rt.engine, credits=5)
    resp = client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": "text", "prompt": PROMPT})
    job_id = resp.get_json()["jobId"]
    assert wait_terminal(rt.engine, [job_id])[job_id] == "completed"

    def seen():
        resp = requests.get(f"{url}/api/tasks", auth=LOGIN, timeout=10)
        assert resp.status_code == 200, resp.text
        tasks = [t for t in resp.json().values() if job_id in str(t.get("args"))]
        return (resp.text, tasks) if tasks else None

    # Its hold was taken by the submit, and a local job's generate task also stores and
    # settles it: the job is one task.
    body, tasks = wait_for(seen, timeout=30, interval=1,
                           message="Flower to show the job's step")
    assert [t["name"] for t in tasks] == ["pipeline.generate"]
    assert all(t["args"] in (f"['{job_id}']", f"('{job_id}',)") for t in tasks), tasks
    for secret in (PROMPT, env["SECRET_KEY"], env["PROVIDER_KEY_SECRETS"], company.api_key):
        assert secret not in body
    rt.engine.dispose()


def test_flower_refuses_to_start_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(PIPELINE_DATA_DIR=str(tmp_path / "var"),
               PIPELINE_ENV_FILE=str(tmp_path / "no.env"))
    proc = subprocess.run([sys.executable, "-m", "service.cli", "flower"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "FLOWER_BASIC_AUTH" in proc.stderr
