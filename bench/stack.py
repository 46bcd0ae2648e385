"""The processes a figure runs against: scratch databases and broker prefixes, gunicorn,
Celery workers, each in its own process group so its CPU time can be read and it can be
stopped whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import requests

from tests.conftest import (
    PG_ADMIN_URL,
    REDIS_URL,
    ROOT,
    _scratch_database,
    _scratch_prefix,
    distributed_env,
    runtime_for,
)

__all__ = ["REDIS_URL", "ROOT", "Proc", "bench_env", "distributed_env", "gunicorn_api",
           "quiet", "rabbitmq_vhost", "runtime_for", "scratch_database", "scratch_prefix",
           "worker"]

scratch_database = _scratch_database
scratch_prefix = _scratch_prefix
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def rabbitmq_vhost():
    """A RabbitMQ virtual host of the run's own, deleted with whatever queues it holds."""
    vhost = f"cp-bench-{uuid.uuid4().hex[:10]}"

    def ctl(*args):
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,  # noqa: S607 (the server's own tool, from PATH as in tests/conftest.py)
                       timeout=60)

    ctl("add_vhost", vhost)
    try:
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        ctl("delete_vhost", vhost)


def quiet(wait_s: float) -> float:
    """Wait (up to wait_s) until no autovacuum worker runs, then checkpoint: the seconds
    waited.

    The figures before this one leave dead rows for the autovacuum and WAL for a
    checkpoint; either, running during this figure, slows its commits. Each figure
    starts after them instead. A server that refuses CHECKPOINT (the bench's user is not
    a superuser) is only waited on."""
    started = time.monotonic()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        while time.monotonic() - started < wait_s:
            busy = admin.execute("SELECT count(*) FROM pg_stat_activity "
                                 "WHERE backend_type = 'autovacuum worker'").fetchone()[0]
            if not busy:
                break
            time.sleep(0.5)
        with contextlib.suppress(psycopg.Error):
            admin.execute("CHECKPOINT")
    return time.monotonic() - started


# The shipped defaults, whatever the caller's environment says (the workers' " ready."
# line is logged at INFO). The API's limits stay on (their cost is the API's) but far
# above any offered load here.
SETTINGS = {"LOG_LEVEL": "info", "TASK_EVENTS": "0",
            "RATE_LIMIT_PER_KEY": "1000000/minute", "RATE_LIMIT_PER_COMPANY": "1000000/minute"}


def bench_env(folder: Path, pg_url: str, prefix: str, **extra) -> dict[str, str]:
    """The tests' distributed environment (PostgreSQL, a broker, local storage) for a figure."""
    return distributed_env(folder, pg_url, prefix, storage_url=f"file://{folder}/store",
                           **{**SETTINGS, **extra})


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of every live process in the group (children that exited and
    were reaped are counted in their parent's cumulative fields)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / _CLOCK_TICKS


class Proc:
    """A subprocess in a session of its own, its output kept in a log file."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env,
                                                         "PYTHONUNBUFFERED": "1"},
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited early:\n{self.log()[-3000:]}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def worker(app: str, env: dict, queues, log_path: Path, *, pool: str = "prefork",
           concurrency: int = 2, name: str = "w") -> Proc:
    """A Celery worker of `app` (tasks.worker, or bench.bare for the reference), consuming.

    The pipeline's workers log as shipped (LOG_LEVEL's default): its lines are part of
    what a job costs.
    """
    cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues),
           "-P", pool, "-c", str(concurrency), "-l", "INFO", "--without-mingle",
           "--without-gossip", "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h"]
    proc = Proc(cmd, env, log_path)
    proc.wait_until(lambda: " ready." in proc.log(), f"worker {name}")
    return proc


def gunicorn_api(env: dict, port: int, log_path: Path, *, workers: int = 2,
                 threads: int = 4) -> Proc:
    """The API as production serves it (service/gunicorn_conf.py, gthread workers)."""
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf",
           "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads",
           str(threads), "--worker-class", "gthread", "--log-level", "warning",
           "api.wsgi:create()"]
    proc = Proc(cmd, env, log_path)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    proc.wait_until(up, "the API")
    proc.url = url
    return proc
