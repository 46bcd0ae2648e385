"""Builds the Celery app from Settings; each worker process builds its Runtime lazily."""

from __future__ import annotations

import threading

from celery import Celery

from pipeline.config import Settings
from tasks import filesystem_broker, names, redis_broker


def broker_options(settings: Settings) -> dict:
    """Transport options per broker family."""
    url = settings.broker_url
    if url.startswith("filesystem"):
        filesystem_broker.install()
        folder = settings.data_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    if url.startswith(("redis", "rediss")):
        redis_broker.install()  # one redis-py client per channel, not one per command
        import celeryconfig
        from tasks.steps import generate_time_limit

        options = {
            # Past the longest a generate step may hold its message (its hard time limit,
            # which follows the GPU deadline) plus the longest retry countdown.
            "visibility_timeout": max(celeryconfig.REDIS_VISIBILITY_TIMEOUT,
                                      generate_time_limit(settings) + 1200),
            # The app's own connections (workers consuming, beat, a task's retry): a
            # broker that vanishes without closing the socket is noticed within these.
            # Job chains are published with tighter ones (publisher_options).
            "socket_connect_timeout": settings.publish_timeout_seconds,
            "socket_timeout": 30,
        }
        if settings.broker_key_prefix:
            options["global_keyprefix"] = settings.broker_key_prefix
        return options
    return {}


def publisher_options(settings: Settings) -> dict:
    """broker_options for the publisher's own connections: no socket wait outlasts the bound.

    Kept off the workers' connections: their BRPOP and heartbeats want longer waits.
    """
    options = broker_options(settings)
    timeout = settings.publish_timeout_seconds
    url = settings.broker_url
    if url.startswith(("redis", "rediss")):
        # A broker that accepts the connection and never answers (stopped, or a black
        # hole on the path) fails each command after `timeout` instead of 30 s.
        options.update(socket_connect_timeout=timeout, socket_timeout=timeout)
    elif url.startswith(("amqp", "pyamqp")):
        # Connect and handshake are bounded by connect_timeout; these bound a declare's
        # reply and a write into a full socket buffer.
        options.update(read_timeout=timeout, write_timeout=timeout, confirm_publish=True)
    return options


def create_celery(settings: Settings) -> Celery:
    app = Celery("pipeline", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = settings.broker_url
    app.conf.broker_transport_options = broker_options(settings)
    app.conf.broker_connection_timeout = settings.publish_timeout_seconds
    app.conf.beat_schedule = {
        "sweep": {"task": names.SWEEP, "schedule": settings.sweep_interval_seconds,
                  "options": {"queue": names.MAINTENANCE_QUEUE, "expires": 60}},
        "ledger-audit": {"task": names.LEDGER_AUDIT,
                         "schedule": settings.audit_interval_seconds,
                         "options": {"queue": names.MAINTENANCE_QUEUE, "expires": 600}},
        "prune": {"task": names.PRUNE, "schedule": settings.prune_interval_seconds,
                  "options": {"queue": names.MAINTENANCE_QUEUE,
                              "expires": settings.prune_interval_seconds}},
        # Due webhook deliveries (the outbox in webhook_deliveries) go out this often.
        "webhooks": {"task": names.WEBHOOK_RELAY, "schedule": settings.webhook_relay_seconds,
                     "options": {"queue": names.MAINTENANCE_QUEUE,
                                 "expires": max(10.0, 5 * settings.webhook_relay_seconds)}},
    }
    # Beat keeps its last-run times here; the folder may not exist on a fresh machine.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.conf.beat_schedule_filename = str(settings.data_dir / "celerybeat-schedule")
    if settings.broker_url.startswith("filesystem"):
        # The filesystem transport has no broadcast, so remote control cannot work there.
        app.conf.worker_enable_remote_control = False
    # Task events feed Flower; off unless TASK_EVENTS=1 (their cost: celeryconfig.py).
    app.conf.worker_send_task_events = settings.task_events
    app.conf.task_send_sent_event = settings.task_events
    app.settings = settings
    app._runtime = None
    from tasks import housekeeping, metrics, steps, sweeps

    steps.register(app)
    sweeps.register(app)
    metrics.connect()
    housekeeping.register(app)
    from tasks import webhooks

    webhooks.register(app)
    return app


_building = threading.Lock()


def runtime_of(app):
    """The process's Runtime, built on first use (after fork, never at import), once:
    the threads of a threads pool ask at the same moment on their first messages, and
    each would otherwise build one of its own (an engine, a registry, a publisher)."""
    if app._runtime is None:
        with _building:
            if app._runtime is None:
                from service.runtime import build_runtime
                from tasks.chain import CeleryPublisher

                app._runtime = build_runtime(app.settings, publisher=CeleryPublisher(app))
    return app._runtime
