"""The job chain, reserve -> generate -> finish (store, then settle), and its publisher.
A job whose hold the API took at submit (pipeline.lifecycle.reserve_if_covered) starts at
generate.

Store and settle run as one task: each is its own use case and transaction, as before,
but one message fewer per job (a publish, a delivery and an acknowledgement) on the
pipeline queue. A delivery lost between the two runs both again: store finds its work
done and settle goes on; the sweeper settles a stored job left unsettled, as before.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from celery import chain

from tasks import names


def build_chain(app, job_id, generate_queue: str, *, reserved: bool = False):
    """The job's chain; `reserved` (its hold taken at submit) leaves the reserve step out."""
    job = str(job_id)

    def step(name: str, queue: str):
        return app.signature(name, args=(job,), immutable=True, queue=queue,
                             routing_key=queue)

    steps = [step(names.GENERATE, generate_queue), step(names.FINISH, names.PIPELINE_QUEUE)]
    if not reserved:
        steps.insert(0, step(names.RESERVE, names.PIPELINE_QUEUE))
    return chain(*steps).on_error(step(names.FAIL_AND_REFUND, names.PIPELINE_QUEUE))


class CeleryPublisher:
    """Publishes a committed job's chain, or raises within settings.publish_timeout_seconds.

    The caller (a request, or the sweeper holding outbox rows locked) never waits on the
    broker longer than the bound, whether it refuses, hangs or drops packets: the publish
    runs on threads of its own and the caller waits for it, and for a free thread, until
    the deadline only. At most `max_in_flight` publishes run at once, each on a pooled
    connection whose socket waits are bounded too (tasks.app.publisher_options), so a
    hung broker holds a few threads for a few seconds and never piles them up. A publish
    that succeeds after its caller gave up sends a chain that the outbox relay sends
    again; each step claims the job, so the copy does nothing.
    """

    # Enough that a burst of requests on a slow but healthy broker never queues for a
    # thread (each one that waited would answer `pending`); few enough that a hung broker
    # cannot pile threads or connections up.
    MAX_IN_FLIGHT = 64

    def __init__(self, app, max_in_flight: int = MAX_IN_FLIGHT):
        self.app = app
        self.timeout = app.settings.publish_timeout_seconds
        self.max_in_flight = max_in_flight
        self._restart = threading.Lock()
        self._start()

    def _start(self) -> None:
        # Nothing here connects or starts a thread before the first publish.
        from tasks.app import publisher_options

        connection = self.app.connection_for_write(
            connect_timeout=self.timeout,
            transport_options=publisher_options(self.app.settings))
        self._connections = connection.Pool(limit=self.max_in_flight)
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._threads = ThreadPoolExecutor(self.max_in_flight,
                                           thread_name_prefix="broker-publish")
        self._pid = os.getpid()

    def publish(self, job_id, queue: str, *, reserved: bool = False) -> None:
        deadline = time.monotonic() + self.timeout
        if self._pid != os.getpid():
            # Forked since (a pool built before a fork is not the child's to use).
            with self._restart:
                if self._pid != os.getpid():
                    self._start()
        if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise TimeoutError(f"{self.max_in_flight} publishes still wait on the broker "
                               f"after {self.timeout}s")
        try:
            sent = self._threads.submit(self._send, job_id, queue, reserved)
        except BaseException:
            self._slots.release()
            raise
        sent.add_done_callback(lambda _: self._slots.release())
        try:
            sent.result(timeout=max(deadline - time.monotonic(), 0))
        except TimeoutError:
            if sent.done():
                raise  # the publish's own timeout, raised within the bound
            raise TimeoutError(
                f"the broker did not take the publish within {self.timeout}s") from None

    def _send(self, job_id, queue: str, reserved: bool) -> None:
        # A connection, not a producer: chain.apply_async drops `producer` and would
        # publish on the app's pool, whose timeouts are the workers'.
        with self._connections.acquire(block=True) as connection:
            # One quick retry rides over a pooled connection the broker has closed; the
            # socket timeouts bound each try, and the caller's deadline bounds them all.
            build_chain(self.app, job_id, queue, reserved=reserved).apply_async(
                connection=connection, retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0,
                              "interval_max": 0},
            )
