"""The reference: a bare 4-task Celery chain with the pipeline's message settings.

`celery -A bench.bare worker`. Same serializer, acknowledgement, prefetch and result
settings as celeryconfig.py, the same queue shape (steps 1, 3 and 4 on one queue, step 2
on another), and no work in the tasks but the last one's counter: what the pipeline adds
on top of this is its own cost.
"""

from __future__ import annotations

import os

import redis
from celery import Celery, chain

FIRST_QUEUE = "bare-pipeline"
SECOND_QUEUE = "bare-local"
COUNTER_KEY = "bench:bare:done"


def create_app(broker_url: str, prefix: str = "") -> Celery:
    app = Celery("bare", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        task_serializer="json", accept_content=["json"], task_ignore_result=True,
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        worker_send_task_events=False, task_send_sent_event=False,
        task_default_queue=FIRST_QUEUE, worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    if prefix and broker_url.startswith("redis"):
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
    counter = {}

    def done(prefix_key: str) -> None:
        client = counter.get("client")
        if client is None:  # one connection per process, made after the fork
            client = counter["client"] = redis.Redis.from_url(
                os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/0"))
        client.incr(prefix_key + COUNTER_KEY)

    @app.task(name="bare.step")
    def step(job_id):
        return None

    @app.task(name="bare.last")
    def last(job_id, counter_prefix):
        done(counter_prefix)

    app.bare_step, app.bare_last = step, last
    return app


def bare_chain(app, job_id: str, counter_prefix: str):
    step, last = app.bare_step, app.bare_last
    return chain(step.si(job_id).set(queue=FIRST_QUEUE),
                 step.si(job_id).set(queue=SECOND_QUEUE),
                 step.si(job_id).set(queue=FIRST_QUEUE),
                 last.si(job_id, counter_prefix).set(queue=FIRST_QUEUE))


# `celery -A bench.bare` finds `app` here; built from the environment the harness sets.
app = create_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
                 os.environ.get("BENCH_BROKER_PREFIX", ""))
