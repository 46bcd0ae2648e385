"""The job chain, reserve -> generate -> store -> settle, and its publisher."""

from __future__ import annotations

from celery import chain

from tasks import names


def build_chain(app, job_id, generate_queue: str):
    job = str(job_id)

    def step(name: str, queue: str):
        return app.signature(name, args=(job,), immutable=True, queue=queue,
                             routing_key=queue)

    return chain(
        step(names.RESERVE, names.PIPELINE_QUEUE),
        step(names.GENERATE, generate_queue),
        step(names.STORE, names.PIPELINE_QUEUE),
        step(names.SETTLE, names.PIPELINE_QUEUE),
    ).on_error(step(names.FAIL_AND_REFUND, names.PIPELINE_QUEUE))


class CeleryPublisher:
    """Publishes a committed job's chain; gives up fast so a request never hangs on it."""

    def __init__(self, app):
        self.app = app

    def publish(self, job_id, queue: str) -> None:
        timeout = self.app.settings.publish_timeout_seconds
        build_chain(self.app, job_id, queue).apply_async(
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": timeout,
                          "interval_max": timeout},
        )
