"""Logs as operators meet them: JSON lines bound to the job, the seed's logs, metrics and
api_usage tables, their retention, and a logs table that can fail without failing a job."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import psycopg
import pytest
from sqlalchemy import event, select, text

from pipeline import lifecycle, logcontext, retention
from pipeline.config import ConfigError, Settings
from pipeline.db import aware_utc, init_db, new_id, utcnow
from pipeline.eventlog import DatabaseLogHandler
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.provider import GenerationRequest
from pipeline.tables import api_usage, jobs, logs, metrics
from pipeline.usage import JOB_FINISHED
from providers.local import LocalProvider
from service.logs import configure_logging
from service.runtime import build_runtime
from tasks import names
from tests.builders import auth, make_company, wait_for, wait_terminal
from tests.fakes.stability import FakeStability

COMPANY_KEY = "sk-company-stability-logs-7d41c2e9b0"


# --- helpers ---------------------------------------------------------------------------------

def _rows(engine, table, *where):
    with engine.connect() as conn:
        return conn.execute(select(table).where(*where)).all()


def _job(rt, company, prompt="a square"):
    return submit_job(rt.engine, rt.registry,
                      principal=Principal(company.company_id, company.user_id, None),
                      req=JobRequest("image", prompt, {"width": 100, "height": 100}),
                      max_prompt_length=4000)["id"]


def _generate_locally(rt, job_id):
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
    with rt.engine.connect() as conn:
        job = get_job(conn, job_id)
    output = LocalProvider().start(GenerationRequest(str(job_id), "image", job.prompt,
                                                     {"width": 100, "height": 100}))
    lifecycle.save_output(rt.engine, rt.storage, job, output)


def _sqlite_runtime(tmp_path):
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path / "var"),
                                          "PIPELINE_ENV_FILE": str(tmp_path / "no.env")})
    rt = build_runtime(settings)
    init_db(rt.engine)
    return rt


@pytest.fixture(params=["postgresql", "sqlite"])
def runtime(request, tmp_path):
    """A runtime on the run's PostgreSQL database, or on an embedded SQLite one."""
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_runtime")
        return
    rt = _sqlite_runtime(tmp_path)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def captured_lines():
    """configure_logging into a buffer (no logs table); the root logger restored after."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    buffer = io.StringIO()

    def configure(settings, service="test"):
        configure_logging(settings, service=service, stream=buffer, table=False)
        return buffer

    yield configure
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def _settings(tmp_path, **env):
    return Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path / "var"),
                                      "PIPELINE_ENV_FILE": str(tmp_path / "no.env"), **env})


# --- through real workers ------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_a_job_through_workers_logs_json_bound_to_it_and_fills_the_seed_tables(
        api_stack, start_worker):
    """A job with the company's own provider key, and one the provider refuses: every
    worker line is JSON, the generate step's carry the job and the company, no line or row
    carries the key; logs rows, one metrics row and one api_usage row per finished job."""
    fake = FakeStability(api_key=COMPANY_KEY).start()
    try:
        env, rt, client, company = api_stack(100, STABILITY_BASE_URL=fake.url)
        put = client.put("/v1/provider-keys/stability", headers=auth(company.admin_key),
                         json={"apiKey": COMPANY_KEY})
        assert put.status_code == 200, put.get_json()
        worker = start_worker(env)
        fake.push("generate", fake.error(400, "invalid_prompts", "a refused prompt"))
        ids = []
        for prompt in ("a lighthouse", "another lighthouse"):
            resp = client.post("/v1/jobs", headers=auth(company.api_key), json={
                "contentType": "image", "prompt": prompt, "provider": "stability"})
            assert resp.status_code == 202, resp.get_json()
            ids.append(resp.get_json()["jobId"])
        statuses = wait_terminal(rt.engine, ids, timeout=90)
    finally:
        fake.stop()
    assert sorted(statuses.values()) == ["completed", "failed"]
    done = next(j for j in ids if statuses[j] == "completed")
    failed = next(j for j in ids if statuses[j] == "failed")

    # The logs table is written behind the job: wait for the settle step's row.
    def rows_of(job_id):
        return _rows(rt.engine, logs, logs.c.job_id == uuid.UUID(job_id))

    wait_for(lambda: any("completed" in r.message for r in rows_of(done)), timeout=20,
             message="the completed job's rows in the logs table")
    wait_for(lambda: any("failed" in r.message for r in rows_of(failed)), timeout=20,
             message="the failed job's rows in the logs table")

    lines = [line for line in worker.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: no banner, no print
    generate = [r for r in records
                if r.get("task") == names.GENERATE and r.get("job_id") == done]
    assert generate, "the generate step logged nothing for the job"
    for record in generate:
        assert record["company_id"] == str(company.company_id)
        assert (record["provider"], record["content_type"]) == ("stability", "image")
        assert record["service"] == "worker"
    # The other step carries the job too: finish (store, settle) logged with it. (The
    # hold was taken by the submit: this job's chain has no reserve step.)
    tasks_seen = {r.get("task") for r in records if r.get("job_id") == done}
    assert {names.GENERATE, names.FINISH} <= tasks_seen
    assert "a lighthouse" not in worker.log()  # prompts are counted, never written

    rows = rows_of(done)
    assert {r.level for r in rows} <= {"info", "warn"}
    assert all((str(r.company_id), r.provider, r.content_type)
               == (str(company.company_id), "stability", "image") for r in rows)
    assert all(r.service == "worker" for r in rows)
    assert {r.metadata["task"] for r in rows} >= {names.GENERATE, names.FINISH}

    with rt.engine.connect() as conn:
        table_text = "\n".join(row for table in ("logs", "metrics", "api_usage")
                               for row in conn.execute(text(
                                   f"SELECT CAST(t AS TEXT) FROM {table} t")).scalars())
    assert COMPANY_KEY not in worker.log()
    assert COMPANY_KEY not in table_text

    for job_id, status in ((done, "completed"), (failed, "failed")):
        finished = _rows(rt.engine, metrics, metrics.c.name == JOB_FINISHED,
                         metrics.c.job_id == uuid.UUID(job_id))
        assert [(r.labels["status"], r.labels["company_id"]) for r in finished] == [
            (status, str(company.company_id))]
        assert finished[0].value >= 0
        usage = _rows(rt.engine, api_usage, api_usage.c.job_id == uuid.UUID(job_id))
        assert [(u.company_id, u.provider, u.content_type, u.metadata["status"])
                for u in usage] == [(company.company_id, "stability", "image", status)]
    with rt.engine.connect() as conn:
        charged = conn.execute(select(jobs.c.actual_cost)
                               .where(jobs.c.id == uuid.UUID(done))).scalar_one()
    assert _rows(rt.engine, api_usage, api_usage.c.job_id == uuid.UUID(done))[0].cost == charged
    assert _rows(rt.engine, api_usage, api_usage.c.job_id == uuid.UUID(failed))[0].cost == 0

    # Beat's prune task, run by the worker: rows past their retention go, these stay.
    old = utcnow() - timedelta(days=400)
    with rt.engine.begin() as conn:
        conn.execute(logs.insert(), [{"id": new_id(), "level": "info", "service": "test",
                                      "message": "ancient", "timestamp": old}] * 1)
        conn.execute(metrics.insert().values(id=new_id(), name="ledger_audit_findings",
                                             value=0, labels={"check": "x"}, timestamp=old))
    rt.publisher.app.send_task(names.PRUNE, queue=names.MAINTENANCE_QUEUE)
    wait_for(lambda: not _rows(rt.engine, logs, logs.c.message == "ancient"), timeout=30,
             message="the prune task to delete the old rows")
    assert not _rows(rt.engine, metrics, metrics.c.timestamp <= old)
    assert rows_of(done)
    assert len(_rows(rt.engine, metrics, metrics.c.job_id.in_(
        [uuid.UUID(j) for j in ids]))) == 2


# --- the analytics rows, exactly once ------------------------------------------------------

def test_a_redelivered_settle_or_fail_writes_no_second_analytics_row(runtime):
    rt = runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    _generate_locally(rt, job_id)
    lifecycle.store(rt.engine, rt.storage, job_id)
    assert lifecycle.settle(rt.engine, job_id)
    assert not lifecycle.settle(rt.engine, job_id)  # redelivered
    assert not lifecycle.fail(rt.engine, job_id, code="INTERNAL_ERROR", message="late errback")

    finished = _rows(rt.engine, metrics, metrics.c.job_id == job_id)
    assert [(r.name, r.labels["status"]) for r in finished] == [(JOB_FINISHED, "completed")]
    usage = _rows(rt.engine, api_usage, api_usage.c.job_id == job_id)
    assert len(usage) == 1
    assert usage[0].cost > 0

    other = _job(rt, company)
    assert lifecycle.fail(rt.engine, other, code="PROVIDER_REJECTED", message="no")
    assert not lifecycle.fail(rt.engine, other, code="INTERNAL_ERROR", message="again")
    finished = _rows(rt.engine, metrics, metrics.c.job_id == other)
    assert [(r.labels["status"], r.labels["error_code"]) for r in finished] == [
        ("failed", "PROVIDER_REJECTED")]
    usage = _rows(rt.engine, api_usage, api_usage.c.job_id == other)
    assert [(u.cost, u.metadata["errorCode"]) for u in usage] == [(0, "PROVIDER_REJECTED")]


def test_a_late_result_replaces_the_failed_jobs_rows(runtime):
    """The hold expired and the job failed; then the provider's output came and it was
    charged after all: one row each, saying completed."""
    rt = runtime
    company = make_company(rt.engine, credits=1)
    job_id = _job(rt, company)
    lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
    _generate_locally(rt, job_id)
    assert lifecycle.fail(rt.engine, job_id, code="HOLD_EXPIRED", message="expired")
    lifecycle.store(rt.engine, rt.storage, job_id)
    assert lifecycle.settle(rt.engine, job_id)

    finished = _rows(rt.engine, metrics, metrics.c.job_id == job_id)
    assert [r.labels["status"] for r in finished] == ["completed"]
    usage = _rows(rt.engine, api_usage, api_usage.c.job_id == job_id)
    assert len(usage) == 1
    assert (usage[0].metadata["status"], usage[0].metadata["late"]) == ("completed", True)
    assert usage[0].cost > 0


# --- the logs table off the job's path -----------------------------------------------------

@pytest.mark.postgres
def test_a_locked_logs_table_neither_fails_nor_slows_a_job(empty_pg_database, tmp_path):
    """The logs table locked by someone else (a slow insert, a long vacuum): the job's
    steps log as usual, finish in their normal time, and the rows land once it is free."""
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"), "DATABASE_URL": empty_pg_database,
        "SECRET_KEY": "k", "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env")})
    rt = build_runtime(settings)
    init_db(rt.engine)
    handler = DatabaseLogHandler(empty_pg_database, service="test", linger=0.05)
    handler.addFilter(logcontext.ContextFilter("test"))
    pipeline_log = logging.getLogger("pipeline")
    pipeline_log.addHandler(handler)
    previous_level = pipeline_log.level
    pipeline_log.setLevel(logging.INFO)
    locker = psycopg.connect(empty_pg_database, autocommit=True)
    try:
        company = make_company(rt.engine, credits=1)
        job_id = _job(rt, company)
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE logs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with logcontext.scope(job_id=job_id, task="test"):
            lifecycle.reserve(rt.engine, job_id, ttl_seconds=60)
            _generate_locally(rt, job_id)
            lifecycle.store(rt.engine, rt.storage, job_id)
            assert lifecycle.settle(rt.engine, job_id)
            for n in range(200):
                logging.getLogger("pipeline.test").info("step %d", n)
        took = time.monotonic() - started
        assert took < 5, f"the job's steps took {took:.1f}s behind a locked logs table"
        assert not handler.flush(timeout=0.5)  # the rows wait for the lock
        locker.execute("ROLLBACK")
        assert handler.flush(timeout=20)
    finally:
        locker.close()
        pipeline_log.removeHandler(handler)
        pipeline_log.setLevel(previous_level)
        handler.close()
    rows = _rows(rt.engine, logs, logs.c.job_id == job_id)
    assert any(r.message.startswith("job completed") for r in rows)
    assert {str(r.company_id) for r in rows} == {str(company.company_id)}
    rt.engine.dispose()


def test_an_unreachable_logs_database_costs_the_caller_nothing(capfd):
    handler = DatabaseLogHandler("postgresql://nobody@127.0.0.1:1/none", service="test",
                                 capacity=100, linger=0.01)
    record = logging.makeLogRecord({"name": "pipeline.x", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "hello"})
    started = time.monotonic()
    for _ in range(1000):  # past the capacity: dropped and counted, never waited for
        handler.handle(record)
    assert time.monotonic() - started < 1.0
    assert handler.flush(timeout=20)  # every batch failed, and was let go
    handler.close()
    assert "log rows not written" in capfd.readouterr().err


def test_the_writer_survives_rows_postgresql_would_refuse(pg_runtime):
    handler = DatabaseLogHandler(pg_runtime.settings.database_url, service="test",
                                 linger=0.01)
    marker = uuid.uuid4().hex
    for msg in (f"{marker} nul \x00 here", f"{marker} lone \ud800 surrogate", f"{marker} ok"):
        handler.handle(logging.makeLogRecord({"name": "pipeline.x", "levelno": logging.ERROR,
                                              "levelname": "ERROR", "msg": msg}))
    assert handler.flush(timeout=20)
    handler.close()
    rows = _rows(pg_runtime.engine, logs, logs.c.message.startswith(marker))
    assert len(rows) == 3
    assert {r.level for r in rows} == {"error"}


@pytest.mark.postgres
def test_a_forked_pool_process_writes_its_own_rows_and_leaves_the_parents_session(
        pg_runtime):
    """A prefork child inherits the handler with the parent's connection open: it must
    write on a connection of its own and never end the parent's."""
    handler = DatabaseLogHandler(pg_runtime.settings.database_url, service="test",
                                 linger=0.01)
    marker = uuid.uuid4().hex

    def say(msg):
        handler.handle(logging.makeLogRecord({"name": "pipeline.x", "levelno": logging.INFO,
                                              "levelname": "INFO", "msg": f"{marker} {msg}"}))

    def session():
        with handler._engine.connect() as conn:
            return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()

    say("parent before")
    assert handler.flush(timeout=20)
    before = session()
    pid = os.fork()
    if pid == 0:  # the child: os._exit, never back into pytest
        code = 1
        try:
            gc.collect()  # what a long-lived pool process does sooner or later
            say("child")
            code = 0 if handler.flush(timeout=20) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert session() == before  # the parent's session lives on
    say("parent after")
    assert handler.flush(timeout=20)
    handler.close()
    rows = _rows(pg_runtime.engine, logs, logs.c.message.startswith(marker))
    assert sorted(r.message.split(" ", 1)[1] for r in rows) == [
        "child", "parent after", "parent before"]


# --- retention -----------------------------------------------------------------------------

def test_prune_deletes_old_rows_in_bounded_batches_and_keeps_the_rest(runtime):
    rt = runtime
    now = utcnow()
    company = make_company(rt.engine, credits=1)
    job_ids = [_job(rt, company, prompt=f"job {n}") for n in range(6)]
    marker = uuid.uuid4().hex
    with rt.engine.begin() as conn:
        conn.execute(logs.insert(), [
            {"id": new_id(), "level": "info", "service": "test", "message": marker,
             "timestamp": now - timedelta(days=age)} for age in [40] * 25 + [1] * 5])
        conn.execute(metrics.insert(), [
            {"id": new_id(), "name": marker, "value": 1, "labels": {},
             "timestamp": now - timedelta(days=age)} for age in [100] * 7 + [1] * 3])
        conn.execute(api_usage.insert(), [
            {"id": new_id(), "company_id": company.company_id, "job_id": job_id,
             "provider": "local", "content_type": "image", "cost": Decimal(0),
             "created_at": now - timedelta(days=age)}
            for job_id, age in zip(job_ids, [500] * 4 + [1] * 2, strict=True)])
    deletes = []

    def count(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement.split()[2])

    event.listen(rt.engine, "before_cursor_execute", count)
    try:
        counts = retention.prune(rt.engine, retention.cutoffs(rt.settings, now), batch=10)
    finally:
        event.remove(rt.engine, "before_cursor_execute", count)
    # Other tests' rows on the shared database are all recent; ours are the only old ones.
    assert counts == {"logs": 25, "metrics": 7, "api_usage": 4}
    assert deletes.count("logs") == 3  # 10 + 10 + 5: never more than a batch at once

    def ages(table, column, *where):  # days old, of the rows left
        with rt.engine.connect() as conn:
            return sorted(round((now - aware_utc(at)) / timedelta(days=1))
                          for at in conn.scalars(select(column).where(*where)))

    assert ages(logs, logs.c.timestamp, logs.c.message == marker) == [1] * 5
    assert ages(metrics, metrics.c.timestamp, metrics.c.name == marker) == [1] * 3
    assert ages(api_usage, api_usage.c.created_at, api_usage.c.job_id.in_(job_ids)) == [1] * 2


def test_retention_of_zero_days_keeps_a_table_forever_and_beat_runs_the_prune(tmp_path):
    from tasks.app import create_celery

    settings = _settings(tmp_path, LOGS_RETENTION_DAYS="0", METRICS_RETENTION_DAYS="7",
                         PRUNE_INTERVAL_SECONDS="600")
    assert set(retention.cutoffs(settings, utcnow())) == {"metrics", "api_usage"}
    schedule = create_celery(settings).conf.beat_schedule["prune"]
    assert (schedule["task"], schedule["schedule"]) == (names.PRUNE, 600)
    assert schedule["options"]["queue"] == names.MAINTENANCE_QUEUE


# --- lines and their context ---------------------------------------------------------------

def test_the_scope_binds_the_job_once_and_leaves_nothing_behind(captured_lines, tmp_path):
    buffer = captured_lines(_settings(tmp_path, OPENAI_API_KEY="sk-platform-never-logged"))
    log = logging.getLogger("pipeline.test")
    job = SimpleNamespace(id=uuid.uuid4(), company_id=uuid.uuid4(), user_id=None,
                          provider="openai", content_type="text")
    stranger = SimpleNamespace(**{**vars(job), "id": uuid.uuid4()})

    logcontext.bind_job(job)  # no scope of this job's: nothing bound
    with logcontext.scope(job_id=job.id, task=names.GENERATE):
        logcontext.bind_job(stranger)  # a sweep's other job: ignored
        logcontext.bind_job(job)
        log.info("calling with %s", "sk-platform-never-logged")
        done = threading.Event()
        seen = {}
        # Another thread's scope is its own.
        threading.Thread(target=lambda: (seen.update(logcontext.current()), done.set())).start()
        done.wait(5)
    log.warning("after")

    inside, after = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert inside["job_id"] == str(job.id)
    assert inside["company_id"] == str(job.company_id)
    assert (inside["provider"], inside["content_type"]) == ("openai", "text")
    assert inside["task"] == names.GENERATE
    assert inside["message"] == "calling with [redacted]"
    assert (inside["level"], inside["logger"], inside["service"]) == ("INFO", "pipeline.test",
                                                                      "test")
    assert "timestamp" in inside
    assert "user_id" not in inside
    assert seen == {}
    assert "job_id" not in after
    assert after["level"] == "WARNING"
    assert dict(logcontext.current()) == {}


def test_text_format_shows_the_same_fields_on_one_line(captured_lines, tmp_path):
    buffer = captured_lines(_settings(tmp_path, LOG_FORMAT="text", LOG_LEVEL="warn"))
    log = logging.getLogger("pipeline.test")
    with logcontext.scope(job_id="j-1", task=names.STORE):
        log.info("not shown below LOG_LEVEL")
        log.warning("shown")
    line, = buffer.getvalue().splitlines()
    assert " WARNING pipeline.test: shown  [job_id=j-1 task=pipeline.store]" in line


@pytest.mark.parametrize(("name", "value"), [("LOG_FORMAT", "xml"), ("LOG_LEVEL", "loud"),
                                             ("LOG_TABLE_LEVEL", "everything")])
def test_log_settings_refuse_unknown_words(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        _settings(tmp_path, **{name: value})


@pytest.mark.postgres
@pytest.mark.redis
def test_each_request_is_one_line_with_its_company_and_never_its_key(api_stack,
                                                                      captured_lines):
    _env, rt, client, company = api_stack(10)
    buffer = captured_lines(rt.settings, service="api")
    ok = client.get("/v1/wallet?x=secret-query", headers={**auth(company.api_key),
                                                          "X-Request-Id": "req-42"})
    refused = client.get("/v1/wallet", headers=auth("not-a-key"))
    assert (ok.status_code, refused.status_code) == (200, 401)
    assert ok.headers["X-Request-Id"] == "req-42"
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    access = [r for r in lines if r["logger"] == "api.access"]
    assert [(r["method"], r["path"], r["status"]) for r in access] == [
        ("GET", "/v1/wallet", 200), ("GET", "/v1/wallet", 401)]
    assert access[0]["company_id"] == str(company.company_id)
    assert access[0]["request_id"] == "req-42"
    assert "company_id" not in access[1]
    assert company.api_key not in buffer.getvalue()
    assert "secret-query" not in buffer.getvalue()
    assert dict(logcontext.current()) == {}
