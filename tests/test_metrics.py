"""Metrics as operators scrape them: real workers (prefork, a child killed mid-run) and the
API's /metrics, the token that guards them, and the Prometheus files checked by promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api import create_app
from pipeline import budgets
from pipeline.tables import jobs
from service.stack import free_port
from tests.builders import auth, make_company, wait_for, wait_terminal
from tests.conftest import REDIS_URL, ROOT, child_pids, distributed_env, runtime_for

OPS = ROOT / "ops"
TOKEN = "metrics-test-token"


def scrape_text(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrape_worker(port: int, token: str | None = TOKEN) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)
    resp.raise_for_status()
    return scrape_text(resp.text)


def scrape_api(client) -> tuple[dict, str]:
    resp = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_data(as_text=True)
    return scrape_text(body), body


class FailingPublisher:
    """A broker that is down at submit: the job waits in the outbox for the sweeper."""

    def publish(self, job_id, queue, *, reserved=False):
        raise ConnectionError("broker down")


def _generating(gauge_file: Path) -> bool:
    """Whether a pool process's own metric file says it runs a generate step now."""
    if not gauge_file.exists():
        return False
    return any(sample.value > 0 for metric in MultiProcessCollector.merge([str(gauge_file)])
               for sample in metric.samples
               if sample.name == "pipeline_tasks_running"
               and sample.labels.get("task") == "pipeline.generate")


def _runs_ffmpeg(pid: int) -> bool:
    """Whether the process has an ffmpeg child: a video render whose output is not stored
    yet."""
    for child in child_pids(pid):
        try:
            if b"ffmpeg" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
        except OSError:  # ended meanwhile
            continue
    return False


def _db_counts(engine) -> dict[tuple[str, str | None], int]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.status, jobs.c.error_code, func.count())
                            .group_by(jobs.c.status, jobs.c.error_code))
        return {(status, code): n for status, code, n in rows}


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.e2e
def test_worker_and_api_metrics_match_what_ran(empty_pg_database, own_redis_prefix, tmp_path,
                                              start_worker):
    pool_port, maintenance_port = free_port(), free_port()
    env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store", METRICS_TOKEN=TOKEN,
                          STALE_AFTER_SECONDS=3, SWEEP_INTERVAL_SECONDS=1,
                          DISPATCH_GRACE_SECONDS=1, AUDIT_INTERVAL_SECONDS=2)
    rt = runtime_for(env)
    client = create_app(rt).test_client()
    before, _ = scrape_api(client)  # this process's counters are the test session's
    rich = make_company(rt.engine, credits=50)
    poor = make_company(rt.engine, credits="0.3", name="poor")

    worker = start_worker({**env, "WORKER_METRICS_PORT": str(pool_port)}, pool="prefork",
                          concurrency=2, queues=["pipeline", "local"], name="pool")
    start_worker({**env, "WORKER_METRICS_PORT": str(maintenance_port)}, queues=["maintenance"],
                 concurrency=1, beat=True, name="maint")

    def submit(company, ctype, settings):
        resp = client.post("/v1/jobs", headers=auth(company.api_key),
                           json={"contentType": ctype, "prompt": "metrics", "settings": settings})
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()["jobId"]

    ids = [submit(rich, "video", {"duration": 6}) for _ in range(6)]
    ids += [submit(rich, "text", {"maxTokens": 20}) for _ in range(10)]
    # A company with a budget takes its holds in the reserve step, not at submit: both
    # pass the fast check at submit; the wallet holds only one: INSUFFICIENT_CREDITS.
    budgets.set_budget(rt.engine, poor.company_id, period="day", cap="100")
    ids += [submit(poor, "video", {"duration": 4}) for _ in range(2)]
    rt.publisher = FailingPublisher()  # the sweeper relays this one (action "dispatched")
    ids.append(submit(rich, "text", {}))

    # Kill a pool process mid-run: one that has finished tasks (its own metric files say
    # so) and now renders a video, its ffmpeg still running. A local job finishes in its
    # generate task, so the generate gauge alone also covers the store and settle after
    # the render: a kill there, after the settle's commit and before the completion is
    # counted, would lose that count with the process.
    folder = tmp_path / "var" / "metrics" / f"pool@{socket.gethostname()}.{worker.proc.pid}"

    def rendering():
        return next((pid for pid in worker.child_pids()
                     if (folder / f"counter_{pid}.db").exists()
                     and _generating(folder / f"gauge_livesum_{pid}.db")
                     and _runs_ffmpeg(pid)), None)

    victim = wait_for(rendering, timeout=60, interval=0.02, message="a process rendering")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "exited prematurely: signal 9" in worker.log(), timeout=30,
             message="the pool to lose a task with its process")
    wait_for(lambda: victim not in worker.child_pids() and len(worker.child_pids()) == 2,
             timeout=30, message="the pool to replace its killed process")

    statuses = wait_terminal(rt.engine, ids, timeout=150)
    counts = _db_counts(rt.engine)
    completed = counts.get(("completed", None), 0)
    assert completed == len(ids) - 1, statuses
    assert counts[("failed", "INSUFFICIENT_CREDITS")] == 1

    def settled_in_worker_metrics():
        # The job's completion is counted inside its last task, a moment before that task
        # returns and leaves the running gauge: wait for both.
        got = scrape_worker(pool_port)
        done = total(got, "pipeline_jobs_completed_total")
        return got if done == completed and total(got, "pipeline_tasks_running") == 0 else None

    pool = wait_for(settled_in_worker_metrics, timeout=20, interval=1,
                    message="the worker's completed counter to reach the database's count")
    # Counters of every process, the killed one's included; histograms have their counts.
    assert total(pool, "pipeline_jobs_completed_total", provider="local",
                 content_type="video") == 7  # six, and the poor company's one
    assert total(pool, "pipeline_jobs_completed_total", content_type="text") == 11
    assert total(pool, "pipeline_jobs_failed_total", provider="local", content_type="video",
                 code="INSUFFICIENT_CREDITS") == 1
    assert total(pool, "pipeline_job_duration_seconds_count", status="completed") == completed
    assert total(pool, "pipeline_job_duration_seconds_count", status="failed") == 1
    # A job's queue wait is observed once, by the claim that starts it. The claim commits
    # on its own, so a process killed between that commit and the observation (the kill
    # below lands at a random point of a generate step) takes the job's one observation
    # with it: the redelivered claim is not the first.
    assert completed - 1 <= total(pool, "pipeline_job_queue_wait_seconds_count",
                                  queue="local") <= completed
    # A local job is stored and settled by its generate task (no finish step published).
    assert total(pool, "pipeline_task_duration_seconds_count",
                 task="pipeline.generate") >= completed
    # A delivery lost with the killed process runs again: at least one run per job.
    assert total(pool, "pipeline_tasks_total", task="pipeline.generate",
                 state="success") >= completed
    assert total(pool, "pipeline_tasks_total", task="pipeline.finish") == 0
    assert total(pool, "pipeline_provider_requests_total", provider="local", operation="start",
                 outcome="ok") >= completed
    assert total(pool, "pipeline_provider_request_seconds_count",
                 provider="local") >= completed
    # The killed process's files: its counts still summed, its running task dropped.
    assert (folder / f"counter_{victim}.db").exists()
    assert not (folder / f"gauge_livesum_{victim}.db").exists()
    assert total(pool, "pipeline_tasks_running") == 0
    # Credits: what was held is what was debited plus released plus refunded.
    with rt.engine.connect() as conn:
        estimated, actual = conn.execute(
            select(func.sum(jobs.c.estimated_cost), func.sum(jobs.c.actual_cost))
            .where(jobs.c.status == "completed")).one()
    assert total(pool, "pipeline_credits_debited_total") == pytest.approx(float(actual),
                                                                          abs=1e-6)
    assert total(pool, "pipeline_credits_released_total") == pytest.approx(
        float(Decimal(estimated) - Decimal(actual)), abs=1e-6)
    # The queues, read from the broker, and who consumes them.
    assert total(pool, "pipeline_broker_up") == 1
    assert total(pool, "pipeline_queue_messages", queue="local") == 0
    assert total(pool, "pipeline_worker_consumes", queue="local") == 1
    assert ("pipeline_worker_consumes", frozenset({("queue", "maintenance")})) not in pool

    maintenance = scrape_worker(maintenance_port)
    assert total(maintenance, "pipeline_sweeper_actions_total", action="dispatched") >= 1
    assert total(maintenance, "pipeline_tasks_total", task="pipeline.sweep",
                 state="success") >= 1

    def audited():
        got, _ = scrape_api(client)
        return got if total(got, "pipeline_ledger_audit_last_run_timestamp_seconds") else None

    api = wait_for(audited, timeout=20, interval=1, message="a ledger audit in /metrics")
    # Holds are taken by the submit (this process, the API) or by the reserve step (the
    # poor company's, with its budget): together, every completed job's estimate.
    held = total(pool, "pipeline_credits_held_total") + total(
        api, "pipeline_credits_held_total") - total(before, "pipeline_credits_held_total")
    assert held == pytest.approx(float(estimated), abs=1e-6)
    assert total(api, "pipeline_jobs_submitted_total") - total(
        before, "pipeline_jobs_submitted_total") == len(ids)
    assert total(api, "pipeline_jobs_submitted_total", provider="local",
                 content_type="video") - total(before, "pipeline_jobs_submitted_total",
                                               provider="local", content_type="video") == 8
    for status in ("pending", "queued", "processing"):
        assert total(api, "pipeline_jobs_in_flight", status=status) == 0
    assert total(api, "pipeline_credit_holds_open") == 0
    assert total(api, "pipeline_credit_holds_expired") == 0
    assert total(api, "pipeline_outbox_backlog") == 0
    assert total(api, "pipeline_outbox_oldest_age_seconds") == 0
    assert total(api, "pipeline_ledger_audit_findings", check="balance_mismatch") == 0

    # Without the token, neither endpoint answers.
    assert requests.get(f"http://127.0.0.1:{pool_port}/metrics", timeout=10).status_code == 401
    assert client.get("/metrics").status_code == 401
    rt.engine.dispose()


def test_every_metric_the_alerts_and_dashboard_use_exists(api_stack):
    """What the ops files query is declared: in this process (the API) or by a collector."""
    _env, _rt, client, _company = api_stack(1, METRICS_TOKEN=TOKEN)
    _, body = scrape_api(client)
    declared = set(re.findall(r"^# HELP (pipeline_\w+)", body, re.M))
    declared |= {"pipeline_queue_messages", "pipeline_worker_consumes", "pipeline_broker_up"}
    counters = {name for name, kind in re.findall(r"^# TYPE (pipeline_\w+) (\w+)", body, re.M)
                if kind == "counter"}
    declared |= {f"{name}_total" for name in counters}
    histograms = re.findall(r"^# TYPE (pipeline_\w+) histogram", body, re.M)
    declared |= {f"{name}_{suffix}" for name in histograms for suffix in ("bucket", "count",
                                                                          "sum")}
    used = set()
    for path in (OPS / "prometheus" / "alerts.yml", OPS / "grafana" / "dashboard.json"):
        used |= set(re.findall(r"\bpipeline_\w+", path.read_text()))
    assert used, "the ops files query no pipeline metric"
    assert used <= declared, sorted(used - declared)


def test_metrics_need_the_token_or_a_loopback_caller(api_stack):
    _env, _rt, client, _company = api_stack(1)
    assert client.get("/metrics").status_code == 200  # the test client calls from 127.0.0.1
    remote = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert remote.status_code == 403
    assert remote.get_json()["code"] == "FORBIDDEN"

    _env, _rt, client, _company = api_stack(1, METRICS_TOKEN=TOKEN)
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.get_json()["code"] == "UNAUTHORIZED"
    right = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                       environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert right.status_code == 200
    assert "pipeline_outbox_backlog" in right.get_data(as_text=True)
    # An API key is no metrics token.
    keyed = client.get("/metrics", headers=auth(_company.api_key))
    assert keyed.status_code == 401


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("promtool is missing: install Debian's prometheus package (.ci/run does)")
    pytest.skip("promtool is not installed (apt-get install prometheus)")
    return ""


def _run_promtool(*args, cwd: Path) -> None:
    proc = subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_scrape_config_passes_promtool(tmp_path):
    # promtool reads the token file the config names; deployments mount theirs there.
    shutil.copytree(OPS / "prometheus", tmp_path / "prometheus")
    (tmp_path / "prometheus" / "metrics_token").write_text("a-token")
    _run_promtool("check", "config", "prometheus.yml", cwd=tmp_path / "prometheus")


@pytest.mark.parametrize("args", [("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")],
                         ids=["check", "test"])
def test_the_alerting_rules_pass_promtool(args):
    _run_promtool(*args, cwd=OPS / "prometheus")


def test_the_dashboard_queries_parse(tmp_path):
    """Every panel's query, as a recording rule promtool parses."""
    board = json.loads((OPS / "grafana" / "dashboard.json").read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{n}", "expr": expr} for n, expr in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps(rules))
    _run_promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


def test_every_alert_has_a_promtool_test_case():
    import yaml

    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]
              if "alert" in rule}
    cases = yaml.safe_load((OPS / "prometheus" / "alerts_test.yml").read_text())
    tested = {case["alertname"] for test in cases["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts == tested


def test_the_dashboard_is_grafana_json():
    board = json.loads((OPS / "grafana" / "dashboard.json").read_text())
    assert board["title"]
    assert all(panel.get("targets") for panel in board["panels"] if panel["type"] != "row")


@pytest.mark.postgres
@pytest.mark.redis
def test_every_gunicorn_process_answers_for_all_of_them(pg_database, module_redis_prefix,
                                                        tmp_path):
    """Under gunicorn (service/gunicorn_conf.py) a scrape reaching any process counts the
    jobs every process accepted."""
    env = distributed_env(tmp_path, pg_database, module_redis_prefix,
                          storage_url=f"file://{tmp_path}/store", METRICS_TOKEN=TOKEN)
    company = make_company(runtime_for(env).engine, credits=10)
    port = free_port()
    log = open(tmp_path / "gunicorn.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:service.gunicorn_conf",
         "--bind", f"127.0.0.1:{port}", "--workers", "3", "api.wsgi:create()"],
        cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
            try:
                return requests.get(f"{url}/healthz", timeout=5).ok
            except requests.RequestException:
                return False

        wait_for(up, timeout=60, message="gunicorn to answer")
        for _ in range(9):  # each request on a connection of its own: any process takes it
            resp = requests.post(f"{url}/v1/jobs", headers=auth(company.api_key), timeout=30,
                                 json={"contentType": "text", "prompt": "counted once"})
            assert resp.status_code == 202, resp.text
        for _ in range(12):
            resp = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=10)
            assert total(scrape_text(resp.text), "pipeline_jobs_submitted_total") == 9
        assert list((tmp_path / "var" / "metrics" / "api").glob("counter_*.db"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


@pytest.fixture(params=["redis", "rabbitmq", "filesystem"])
def broker_env(request, tmp_path, own_redis_prefix):
    env = {"PIPELINE_DATA_DIR": str(tmp_path / "var"), "SECRET_KEY": "k",
           "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
           "PIPELINE_ENV_FILE": str(tmp_path / "no.env")}
    if request.param == "redis":
        env.update(CELERY_BROKER_URL=REDIS_URL, CELERY_BROKER_KEY_PREFIX=own_redis_prefix)
    elif request.param == "rabbitmq":
        env["CELERY_BROKER_URL"] = request.getfixturevalue("rabbitmq_url")
    return env


@pytest.mark.redis
def test_queue_depths_come_from_the_broker(broker_env):
    from kombu import Queue

    from pipeline.config import Settings
    from tasks.app import create_celery
    from tasks.metrics import queue_depths

    app = create_celery(Settings.from_env(environ=broker_env))
    name = f"metrics-test-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, routing_key=name)
    with app.connection_for_write() as conn, conn.Producer() as producer:
        for n in range(3):
            producer.publish({"n": n}, routing_key=name, declare=[queue], serializer="json")
    try:
        depths = queue_depths(app, [f"{name}-never-declared", name])
        assert depths == {f"{name}-never-declared": 0, name: 3}
    finally:
        with app.connection_for_write() as conn:
            queue(conn.default_channel).delete()


def test_comfyui_instances_show_busy_while_leased(api_stack):
    from pipeline import leases

    _env, rt, client, _company = api_stack(
        1, COMFY_WORKER_URL="http://user:pw@gpu-a:8188,http://gpu-b:8188", METRICS_TOKEN=TOKEN)
    instances = rt.registry.instances("comfyui")
    job_id = uuid.uuid4()
    assert leases.acquire(rt.engine, instances[:1], job_id, ttl_seconds=60)
    got, body = scrape_api(client)
    leases.release(rt.engine, instances[0], job_id)
    assert total(got, "pipeline_provider_instance_busy", provider="comfyui",
                 instance="http://gpu-a:8188") == 1
    assert total(got, "pipeline_provider_instance_busy", provider="comfyui",
                 instance="http://gpu-b:8188") == 0
    assert "pw@" not in body
