"""A worker node's metrics: its multiprocess folder, its exporter, and Celery's signals.

At `worker_init` (the main process, before the pool forks) the node's folder
(METRICS_DIR/<node name>.<pid>) is emptied and chosen, and the core's events are recorded
from then on, in every pool process. Once the worker is ready its main process serves
the node's metrics on WORKER_METRICS_HOST:WORKER_METRICS_PORT (0: not served): every
process's counters, dead children's included, plus what it reads from the broker at
each scrape (queue depths, the queues it consumes). Task signals give each task's
duration and final state, and the sweep's result its actions.

This works however the worker was started (`pipeline worker`, `celery -A tasks.worker
worker`, a test's subprocess): everything hangs off the worker's own signals.
"""

from __future__ import annotations

import logging
import os
import time

from celery import signals

from pipeline import telemetry
from tasks import names

log = logging.getLogger("pipeline.metrics")

# Bounds one scrape's reading of the broker, whatever its state.
BROKER_READ_SECONDS = 5.0

_started: dict[str, float] = {}  # task id -> when its body began, in this process


def connect() -> None:
    """Listen to the worker's signals (once per process, however often it is called)."""
    for signal, receiver in (
        (signals.worker_init, _on_worker_init),
        (signals.worker_ready, _on_worker_ready),
        (signals.worker_process_shutdown, _on_process_shutdown),
        (signals.task_prerun, _on_task_prerun),
        (signals.task_postrun, _on_task_postrun),
    ):
        signal.connect(receiver, weak=False, dispatch_uid=f"pipeline.metrics.{signal.name}")


def _recorder():
    from service import metrics

    return metrics.recorder()


def _on_worker_init(sender=None, **_):
    from service import metrics

    settings = sender.app.settings
    metrics.use_directory(metrics.node_directory(settings.metrics_dir, sender.hostname))
    telemetry.install(_recorder())


def _on_worker_ready(sender=None, **_):
    from service import metrics

    app = sender.app
    settings = app.settings
    if not settings.worker_metrics_port:
        return
    registry = metrics.scrape_registry(BrokerCollector(app))
    try:
        metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port, registry,
                      settings.metrics_token)
    except OSError as exc:
        log.error("metrics exporter: cannot listen on %s:%s (%s); this node's metrics are "
                  "not served", settings.worker_metrics_host, settings.worker_metrics_port,
                  exc)
        return
    log.info("metrics exporter on %s:%s", settings.worker_metrics_host,
             settings.worker_metrics_port)


def _on_process_shutdown(pid=None, **_):
    # A pool process that ends in order drops its own live gauges; the main process
    # drops those of one that was killed, at the next scrape.
    from service import metrics

    metrics.mark_process_dead(pid or os.getpid())


def _on_task_prerun(task_id=None, task=None, **_):
    _started[task_id] = time.monotonic()
    _recorder().task_started(task.name)


def _on_task_postrun(task_id=None, task=None, state=None, retval=None, **_):
    began = _started.pop(task_id, None)
    seconds = None if began is None else time.monotonic() - began
    recorder = _recorder()
    recorder.task_finished(task.name, (state or "unknown").lower(), seconds)
    if task.name == names.SWEEP:
        # What the sweeps did, also when one of them failed (SweepFailed carries the rest).
        counts = retval if isinstance(retval, dict) else getattr(retval, "counts", None)
        if isinstance(counts, dict):
            recorder.swept(counts)


class BrokerCollector:
    """Read from the broker at each scrape: how many messages wait in each queue, and
    which queues this node consumes (a queue with messages and no consumer anywhere is
    one whose workers are all gone)."""

    def __init__(self, app):
        # Imported here, in the main thread: an import running on the exporter's thread
        # while the pool forks would leave the child that module's lock, held forever.
        from prometheus_client.core import GaugeMetricFamily

        self.app = app
        self.family = GaugeMetricFamily

    def collect(self):
        family = self.family
        consumed = sorted(self.app.amqp.queues.consume_from)
        consumes = family("pipeline_worker_consumes",
                          "1 for each queue this worker node consumes", labels=["queue"])
        for queue in consumed:
            consumes.add_metric([queue], 1)
        yield consumes
        depth = family("pipeline_queue_messages", "Messages waiting in the queue (read from "
                       "the broker by every worker node: take the max by queue)",
                       labels=["queue"])
        up = family("pipeline_broker_up",
                    "1 when this scrape could read the queues from the broker")
        try:
            depths = queue_depths(self.app, sorted({*names.ALL_QUEUES, *consumed}))
        except Exception as exc:
            log.warning("metrics: cannot read queue depths (%s)", type(exc).__name__)
            up.add_metric([], 0)
        else:
            for queue, count in depths.items():
                depth.add_metric([queue], count)
            up.add_metric([], 1)
        yield depth
        yield up


def queue_depths(app, queues) -> dict[str, int]:
    """Messages ready in each queue; a queue never declared holds none.

    RabbitMQ answers a passive declare with the count. kombu's own transports (Redis,
    the filesystem) count what they store: Redis's LLEN of the queue's lists, key prefix
    and priorities included. Not their passive declare: under a key prefix, kombu 5.7
    asks Redis EXISTS without the prefix and finds no queue at all.
    """
    from tasks.app import publisher_options

    settings = app.settings
    deadline = time.monotonic() + BROKER_READ_SECONDS
    depths = {}
    with app.connection_for_read(connect_timeout=settings.publish_timeout_seconds,
                                 transport_options=publisher_options(settings)) as conn:
        channel = conn.channel()
        try:
            for queue in queues:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the broker took over {BROKER_READ_SECONDS}s")
                stored = getattr(channel, "_size", None)  # kombu's virtual transports
                try:
                    depths[queue] = stored(queue) if stored else channel.queue_declare(
                        queue=queue, passive=True)[1]
                except conn.channel_errors:
                    depths[queue] = 0
                    channel = conn.channel()  # RabbitMQ closes a channel on NOT_FOUND
        finally:
            channel.close()
    return depths
