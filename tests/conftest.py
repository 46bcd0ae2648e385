"""Shared fixtures: a PostgreSQL database, a Redis key prefix, moto's S3 server, and workers.

Every run makes its own database and Redis key prefix and removes them at the end:
the servers are shared by everything running on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from pipeline.config import Settings
from pipeline.db import init_db
from service.runtime import build_runtime
from service.stack import free_port, worker_command
from tests.builders import wait_for

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def _pg_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


@contextmanager
def _scratch_database(kind: str):
    """A fresh PostgreSQL database, dropped (connections and all) when done."""
    name = f"cp_{kind}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _scratch_prefix():
    """A key prefix of our own on the shared Redis; its keys are deleted when done."""
    prefix = f"cp-test-{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*", count=500):
            client.delete(key)


@pytest.fixture(scope="session")
def pg_database():
    """The run's PostgreSQL database, shared by tests that only add their own rows."""
    with _scratch_database("test") as url:
        yield url


@pytest.fixture
def empty_pg_database():
    """A database of one test's own: schema setup, whole-database audits, sweeps."""
    with _scratch_database("own") as url:
        yield url


@pytest.fixture(scope="session")
def redis_prefix():
    with _scratch_prefix() as prefix:
        yield prefix


@pytest.fixture(scope="module")
def module_redis_prefix():
    """For a test module whose published jobs no worker will ever run."""
    with _scratch_prefix() as prefix:
        yield prefix


@pytest.fixture
def own_redis_prefix():
    """For one test, when what other tests left in the broker would disturb it
    (a test that waits for the queues to drain, say)."""
    with _scratch_prefix() as prefix:
        yield prefix


@pytest.fixture(scope="session")
def rabbitmq_url():
    """A RabbitMQ virtual host of our own (guest may use it); deleted at the end."""
    vhost = f"cp-test-{uuid.uuid4().hex[:10]}"

    def ctl(*args):
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    ctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 in server mode, spoken to over HTTP by boto3 in tests and workers."""
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def distributed_env(tmp_path: Path, pg_url: str, prefix: str, *, storage_url: str,
                    s3_endpoint: str | None = None, **extra) -> dict[str, str]:
    env = {
        "PIPELINE_DATA_DIR": str(tmp_path / "var"),
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_BROKER_KEY_PREFIX": prefix,
        "STORAGE_URL": storage_url,
        "SECRET_KEY": "test-secret-key",
        "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        "PUBLIC_URL": "http://testserver",
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
        **AWS_ENV,
    }
    if s3_endpoint:
        env["S3_ENDPOINT_URL"] = s3_endpoint
    env.update({k: str(v) for k, v in extra.items()})
    return env


def runtime_for(env: dict, *, wrap=lambda publisher: publisher):
    """A Runtime from an environment, publishing to its broker, its schema in place."""
    from tasks.app import create_celery
    from tasks.chain import CeleryPublisher

    settings = Settings.from_env(environ=env)
    runtime = build_runtime(settings, publisher=wrap(CeleryPublisher(create_celery(settings))))
    init_db(runtime.engine)
    return runtime


@pytest.fixture
def api_stack(pg_database, own_redis_prefix, tmp_path):
    """api_stack(credits, **env) -> (env, runtime, API client, new company): a distributed
    setup of one test's own (Redis prefix, local storage), engines disposed at the end."""
    from api import create_app
    from tests.builders import make_company

    runtimes = []

    def make(credits, **extra):
        env = distributed_env(tmp_path, pg_database, own_redis_prefix,
                              storage_url=f"file://{tmp_path}/store", **extra)
        rt = runtime_for(env)
        runtimes.append(rt)
        return env, rt, create_app(rt).test_client(), make_company(rt.engine, credits=credits)

    yield make
    for rt in runtimes:
        rt.engine.dispose()


@pytest.fixture(scope="session")
def pg_runtime(pg_database, tmp_path_factory):
    """A Runtime on the run's PostgreSQL database with local storage and no publisher."""
    tmp = tmp_path_factory.mktemp("pg-runtime")
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp), "DATABASE_URL": pg_database, "SECRET_KEY": "k",
        "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        "PIPELINE_ENV_FILE": str(tmp / "no.env")})
    runtime = build_runtime(settings)
    init_db(runtime.engine)
    yield runtime
    runtime.engine.dispose()


def child_pids(pid: int) -> list[int]:
    """The live children of a process (procps' pgrep)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


class Worker:
    """A real Celery worker in a subprocess, with its log kept for failure messages."""

    def __init__(self, env: dict, log_path: Path, *, queues=None, concurrency: int = 4,
                 pool: str = "threads", beat: bool = False, name: str | None = None):
        from tasks.names import ALL_QUEUES

        self.log_path = log_path
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        cmd = worker_command(queues or ALL_QUEUES, pool=pool, concurrency=concurrency,
                             beat=beat, hostname=f"{self.name}@%h")
        child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            if " ready." in self.log():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def child_pids(self) -> list[int]:
        return child_pids(self.proc.pid)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path):
    """Factory: start_worker(env, **options) -> a ready Worker, stopped after the test."""
    workers: list[Worker] = []

    def start(env: dict, **options) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{len(workers)}.log", **options)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()


def pytest_report_header(config):
    return [f"python: {sys.executable}", f"postgres: {PG_ADMIN_URL}", f"redis: {REDIS_URL}"]


class RedisServer:
    """A Redis of this test's own, which it may kill and restart (never the shared one)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self._log = open(workdir / "redis.log", "ab")  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Nothing is kept on disk: a restart loses every queued and unacknowledged message.
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up():
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_for(up, timeout=20, interval=0.05, message="redis-server to answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_for: float = 0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.kill()
        self._log.close()


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # a stopped process cannot die of SIGKILL
    server.close()                                 # until it is continued on some kernels
