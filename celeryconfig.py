"""Celery settings that hold for every deployment; each says why it is set.

The broker URL, key prefix and beat interval come from pipeline.config.Settings and
are applied in tasks/app.py on top of this module.
"""

from kombu import Exchange, Queue

from tasks import names

# Only ids travel; JSON keeps messages readable in Flower and refuses pickled objects.
task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"

# Job state lives in the database. A result backend would cost a Redis round trip (and
# a connection per greenlet under gevent) on every task for data nobody reads.
task_ignore_result = True
task_store_errors_even_if_ignored = False
# Even unused, the (disabled) backend object is built by every thread that publishes (a
# chain's next step does), through a scan of the installed packages' entry points:
# measured, 2 ms per thread, 100 times over on a SaaS node's first wave. One object,
# shared: the disabled backend holds nothing.
result_backend_thread_safe = True

# At least once: the message is acknowledged after the task body returns, so a worker
# killed mid-task leaves it to be delivered again; every step is idempotent for that.
task_acks_late = True
# A child process killed by SIGKILL or the OOM killer requeues its message instead of
# dropping it. The generate step counts its own starts (jobs.attempts) and fails the
# job past the cap, since Celery has no redelivery limit of its own.
task_reject_on_worker_lost = True
# One message at a time per process: a long provider call must not sit on a second
# message that another idle worker could run.
worker_prefetch_multiplier = 1
# On losing the broker connection, cancel what runs instead of finishing tasks whose
# acknowledgement can no longer be sent (they will be redelivered anyway).
worker_cancel_long_running_tasks_on_connection_loss = True
broker_connection_retry_on_startup = True

# Time limits: the soft limit raises inside the task so it can fail and refund cleanly;
# the hard limit kills a stuck process. Per-task values are set on the tasks.
task_soft_time_limit = 60
task_time_limit = 90

task_default_queue = names.PIPELINE_QUEUE
task_create_missing_queues = True
_exchange = Exchange("pipeline", type="direct")
task_queues = [Queue(name, _exchange, routing_key=name) for name in names.ALL_QUEUES]
task_default_exchange = "pipeline"
task_default_routing_key = names.PIPELINE_QUEUE
# generate's queue depends on the job's provider and is set on its signature; these
# are the fixed homes of everything else.
task_routes = {
    names.RESERVE: {"queue": names.PIPELINE_QUEUE, "routing_key": names.PIPELINE_QUEUE},
    names.FINISH: {"queue": names.PIPELINE_QUEUE, "routing_key": names.PIPELINE_QUEUE},
    names.STORE: {"queue": names.PIPELINE_QUEUE, "routing_key": names.PIPELINE_QUEUE},
    names.SETTLE: {"queue": names.PIPELINE_QUEUE, "routing_key": names.PIPELINE_QUEUE},
    names.FAIL_AND_REFUND: {"queue": names.PIPELINE_QUEUE, "routing_key": names.PIPELINE_QUEUE},
    names.SWEEP: {"queue": names.MAINTENANCE_QUEUE, "routing_key": names.MAINTENANCE_QUEUE},
    names.LEDGER_AUDIT: {"queue": names.MAINTENANCE_QUEUE,
                         "routing_key": names.MAINTENANCE_QUEUE},
    names.WEBHOOK_RELAY: {"queue": names.MAINTENANCE_QUEUE,
                          "routing_key": names.MAINTENANCE_QUEUE},
    names.WEBHOOK_DELIVER: {"queue": names.MAINTENANCE_QUEUE,
                            "routing_key": names.MAINTENANCE_QUEUE},
}

# Redis: a message not acknowledged within this window is handed to another worker.
# It must exceed the longest hard time limit plus any retry countdown, or a slow but
# healthy task would run twice. Applied in tasks/app.py for Redis brokers.
REDIS_VISIBILITY_TIMEOUT = 3600

worker_hijack_root_logger = False
# Task events (Flower's live view) cost the workers about a sixth of their throughput
# (measured: 300 local text jobs, PostgreSQL + Redis, two prefork workers of two
# processes, 4 runs each way: 28-40 jobs/s without, 23-33 with, 0.84x pair by pair), so
# they are off unless TASK_EVENTS=1 (tasks/app.py). Flower turns them on in the workers
# it watches while it runs, through remote control.
worker_send_task_events = False
task_send_sent_event = False
