"""Prometheus metrics: declared once, recorded for the core, and served to a scrape.

Every process that runs use cases (an API process, a worker's pool processes) installs
one `PrometheusRecorder` as the core's telemetry recorder (pipeline/telemetry.py). A
process family that forks (a prefork worker and its children, gunicorn's workers) uses
prometheus-client's multiprocess mode: each process writes its values to files of its
own in PROMETHEUS_MULTIPROC_DIR, and whoever answers a scrape sums them, so the counts
of a child that was killed stay counted. The variable must be set, and the folder
wiped, before prometheus_client is first imported in the family's first process
(`use_directory`); a process whose children are gone drops their live gauges
(`mark_dead_processes`), since a SIGKILLed child never says so itself.

Who serves what: the API's /metrics (api/metrics.py) adds the gauges read from the
database; each worker node's main process serves its node's (`serve`, started by
tasks/metrics.py), with the queue depths it reads from the broker. Both ask for
`METRICS_TOKEN` as a Bearer token when one is set, and answer only loopback callers
when none is.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import re
import shutil
import sys
import threading
from decimal import Decimal
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from pipeline import telemetry

log = logging.getLogger("pipeline.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. Jobs run from a second (local text) to an hour (a video render, queued).
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class PrometheusRecorder(telemetry.Recorder):
    """Every metric the processes record, declared once (the README lists them)."""

    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = REGISTRY if registry is None else registry
        job = ("provider", "content_type")
        self.jobs_submitted = Counter(
            "pipeline_jobs_submitted", "Jobs accepted by the API (written with their outbox "
            "row)", job, registry=registry)
        self.jobs_completed = Counter(
            "pipeline_jobs_completed", "Jobs settled and completed", job, registry=registry)
        self.jobs_failed = Counter(
            "pipeline_jobs_failed", "Jobs that ended failed (refunded), by error code",
            (*job, "code"), registry=registry)
        self.jobs_cancelled = Counter(
            "pipeline_jobs_cancelled", "Jobs that ended cancelled (refunded)", job,
            registry=registry)
        self.job_duration = Histogram(
            "pipeline_job_duration_seconds", "From submission to the job's end",
            (*job, "status"), buckets=JOB_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "pipeline_job_queue_wait_seconds", "From publication to the generate step's "
            "first claim, by the queue of the job's provider", ("queue",),
            buckets=WAIT_BUCKETS, registry=registry)
        self.provider_requests = Counter(
            "pipeline_provider_requests", "Calls to a provider's adapter (start, or check of "
            "remote work) by outcome: ok, pending, transient, refused (code says why), error",
            ("provider", "operation", "outcome", "code"), registry=registry)
        self.provider_seconds = Histogram(
            "pipeline_provider_request_seconds", "How long a provider call took",
            ("provider", "operation"), buckets=REQUEST_BUCKETS, registry=registry)
        self.credits_moved = {
            movement: Counter(f"pipeline_credits_{movement}", text, ("provider",),
                              registry=registry)
            for movement, text in (
                ("held", "Credits put on hold by the reserve step"),
                ("debited", "Credits charged for completed jobs"),
                ("released", "Unspent parts of holds returned when a job settled"),
                ("refunded", "Whole holds returned for failed or cancelled jobs"))}
        self.tasks = Counter(
            "pipeline_tasks", "Task runs by final state: success, retry, ignored, failure",
            ("task", "state"), registry=registry)
        self.task_duration = Histogram(
            "pipeline_task_duration_seconds", "How long a task body ran", ("task",),
            buckets=TASK_BUCKETS, registry=registry)
        self.tasks_running = Gauge(
            "pipeline_tasks_running", "Tasks running now (a dead process's are dropped)",
            ("task",), multiprocess_mode="livesum", registry=registry)
        self.sweeper_actions = Counter(
            "pipeline_sweeper_actions", "What the sweeper did, by action (dispatched, "
            "redriven, expired, holds_closed, ...)", ("action",), registry=registry)

    # --- the core's events ---------------------------------------------------------------

    def job_submitted(self, provider, content_type):
        self.jobs_submitted.labels(provider, content_type).inc()

    def job_finished(self, provider, content_type, status, code, seconds):
        if status == "completed":
            self.jobs_completed.labels(provider, content_type).inc()
        elif status == "cancelled":
            self.jobs_cancelled.labels(provider, content_type).inc()
        else:
            self.jobs_failed.labels(provider, content_type, code or "").inc()
        self.job_duration.labels(provider, content_type, status).observe(seconds)

    def job_started(self, queue, waited_seconds):
        self.queue_wait.labels(queue).observe(waited_seconds)

    def provider_request(self, provider, operation, outcome, code, seconds):
        self.provider_requests.labels(provider, operation, outcome, code).inc()
        self.provider_seconds.labels(provider, operation).observe(seconds)

    def credits(self, movement, provider, amount: Decimal):
        self.credits_moved[movement].labels(provider).inc(float(amount))

    # --- the tasks' (tasks/metrics.py) ---------------------------------------------------

    def task_started(self, task: str) -> None:
        self.tasks_running.labels(task).inc()

    def task_finished(self, task: str, state: str, seconds: float | None) -> None:
        self.tasks_running.labels(task).dec()
        self.tasks.labels(task, state).inc()
        if seconds is not None:
            self.task_duration.labels(task).observe(seconds)

    def swept(self, counts: dict) -> None:
        for action, count in counts.items():
            if isinstance(count, int) and count > 0:
                self.sweeper_actions.labels(action).inc(count)


_shared: PrometheusRecorder | None = None
_shared_lock = threading.Lock()


def recorder() -> PrometheusRecorder:
    """This process's recorder: the metrics are made on first use, once."""
    global _shared  # noqa: PLW0603 - metrics are process-wide, like prometheus' own registry
    with _shared_lock:
        if _shared is None:
            _shared = PrometheusRecorder()
        return _shared


# --- multiprocess mode -------------------------------------------------------------------


def node_directory(base: Path, node: str) -> Path:
    """This worker node's folder under `base`: `<node name>.<main pid>`.

    The pid keeps apart two workers started with the same node name on one machine
    (`pipeline worker` twice without --hostname is celery@host twice). The folders of
    this node name whose main process is gone are removed: their counts died with it.
    """
    name = re.sub(r"[^A-Za-z0-9_@-]", "_", node) or "worker"
    pattern = re.compile(rf"{re.escape(name)}\.(\d+)")
    if base.is_dir():
        for old in base.iterdir():
            found = pattern.fullmatch(old.name)
            if found and int(found.group(1)) != os.getpid() and not _alive(int(found.group(1))):
                shutil.rmtree(old, ignore_errors=True)
    return base / f"{name}.{os.getpid()}"


def use_directory(path: Path) -> None:
    """Empty `path` and make this process, and every process it forks, record there.

    Call in the family's first process before any metric is made: a metric made before
    keeps its values in memory, where no scrape of the folder sees them.
    """
    if _shared is not None:
        raise RuntimeError("metrics were made before their multiprocess folder was chosen")
    shutil.rmtree(path, ignore_errors=True)  # a previous run's files would count again
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client picks its value class when first imported; it was imported
        # before the variable was set (no metric made yet, checked above): pick again.
        values.ValueClass = values.MultiProcessValue()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (killed, not yet reaped) is gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    return True


def mark_process_dead(pid: int) -> None:
    """Drop an ended process's live gauges; its counters and histograms stay counted."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)


def mark_dead_processes(path: Path) -> list[int]:
    """Drop the live gauges of the processes whose files are here and who are gone."""
    from prometheus_client import multiprocess

    dead = []
    for file in path.glob("gauge_live*_*.db"):
        pid = file.stem.rpartition("_")[2]
        if pid.isdigit() and int(pid) not in dead and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(path))
            dead.append(int(pid))
    return dead


class _ProcessFamily:
    """This process family's metrics: every process's files, or this process's registry."""

    def __init__(self):
        from prometheus_client import REGISTRY, multiprocess

        folder = os.environ.get(MULTIPROC_ENV)
        self.folder = Path(folder) if folder else None
        self.source = (multiprocess.MultiProcessCollector(None, folder) if folder
                       else REGISTRY)

    def collect(self):
        if self.folder is not None:
            mark_dead_processes(self.folder)
        yield from self.source.collect()


def scrape_registry(*collectors):
    """What a scrape of this process answers: the family's metrics, then `collectors`."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)  # nothing collects at registration
    for collector in (_ProcessFamily(), *collectors):
        registry.register(collector)
    return registry


# --- who may scrape ----------------------------------------------------------------------


def may_scrape(authorization: str | None, remote_addr: str | None, token: str) -> bool:
    """With a token set, only a request carrying it (`Authorization: Bearer <token>`);
    without one, only a caller on this machine's loopback."""
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode())
    try:
        return ipaddress.ip_address(remote_addr or "").is_loopback
    except ValueError:
        return False


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):
        """Scrapes every few seconds would drown the worker's log."""


def serve(host: str, port: int, registry, token: str):
    """Serve `registry` on host:port from a daemon thread; the server, to shut it down."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def guarded(environ, start_response):
        if not may_scrape(environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR"),
                          token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b"metrics need Authorization: Bearer <METRICS_TOKEN>\n"]
        return metrics_app(environ, start_response)

    server = make_server(host, port, guarded, server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-exporter",
                     daemon=True).start()
    if not token:
        log.warning("metrics exporter on %s:%s: no METRICS_TOKEN, so only loopback callers "
                    "are answered", host, port)
    return server
