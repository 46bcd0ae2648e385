"""The chain's tasks. Each turns its message (a job id) into one use-case call.

Ending a chain early is `Ignore`: the message is acknowledged, nothing more runs,
and the job row already says why.
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore, SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from pipeline import catalogue, generation, lifecycle
from pipeline.budgets import BudgetExceeded
from pipeline.errors import InsufficientCredits
from pipeline.storage import StorageUnavailable
from tasks import names
from tasks.base import JobTask

log = logging.getLogger("pipeline.tasks")


def generate_time_limit(settings) -> int:
    """The generate step's hard limit: past the longest GPU poll loop and storage retry.

    Our own loop enforces each provider's deadline (the threads and gevent pools ignore
    Celery's limits); this is the backstop that kills a prefork child stuck anyway.
    """
    longest = max([300] + [catalogue.deadline_for(info.name, settings.provider_env)
                           for info in catalogue.CATALOGUE if info.holds_slot])
    return longest + settings.storage_retry_seconds + 60


def run_generate(task, job_id) -> None:
    """Map the use case's outcome onto Celery: return, Ignore, or retry at a time."""
    try:
        outcome = generation.generate(task.runtime, job_id)
    except SoftTimeLimitExceeded:
        generation.abandon(task.runtime, job_id, code="PROVIDER_TIMEOUT",
                           message="The provider took longer than the step's time limit.")
        raise Ignore() from None
    if isinstance(outcome, generation.Stop):
        raise Ignore()
    if isinstance(outcome, generation.Continue) and outcome.here:
        finish_here(task, job_id)
    if isinstance(outcome, generation.Later):
        options = {"queue": outcome.queue, "routing_key": outcome.queue} if outcome.queue else {}
        # max_retries is None on this task: our own counters and deadlines bound it.
        raise task.retry(countdown=outcome.countdown, **options)


def finish_here(task, job_id) -> None:
    """The finish step's work in this task, and the chain's finish step dropped.

    Whatever fails here leaves the finish step in the chain, to run on the pipeline queue
    as it would have: store and settle are idempotent, and its retries wait out a
    database or an object store that is down. A delivery lost after this finished finds
    the job finished and runs nothing again.
    """
    try:
        lifecycle.finish(task.runtime.engine, task.runtime.storage, job_id)
    except Exception as exc:
        log.warning("job %s: finishing in place failed (%s); the finish step takes it",
                    job_id, type(exc).__name__)
        return
    chain = task.request.chain
    # The chain travels in the message, its next step last.
    if chain and chain[-1].get("task") == names.FINISH:
        task.request.chain = chain[:-1]


def register(app) -> None:
    retry_db = {"autoretry_for": (OperationalError,), "retry_backoff": True,
                "retry_jitter": True}

    @app.task(name=names.RESERVE, shared=False, base=JobTask, bind=True, **retry_db)
    def reserve(self, job_id):
        engine = self.runtime.engine
        try:
            reserved = lifecycle.reserve(engine, job_id,
                                         ttl_seconds=self.runtime.settings.hold_timeout_seconds)
        except (InsufficientCredits, BudgetExceeded) as exc:
            lifecycle.fail_for_credits(engine, job_id, exc)
            raise Ignore() from None
        if not reserved:
            raise Ignore()

    hard_limit = generate_time_limit(app.settings)

    @app.task(name=names.GENERATE, shared=False, base=JobTask, bind=True, max_retries=None,
              soft_time_limit=hard_limit - 30, time_limit=hard_limit, **retry_db)
    def generate(self, job_id):
        run_generate(self, job_id)

    # An object store that is down (or slowing us down) is waited out, never a failed job.
    retry_storage = {**retry_db, "autoretry_for": (OperationalError, StorageUnavailable)}

    @app.task(name=names.FINISH, shared=False, base=JobTask, bind=True, max_retries=None,
              **retry_storage)
    def finish(self, job_id):
        lifecycle.finish(self.runtime.engine, self.runtime.storage, job_id)

    @app.task(name=names.STORE, shared=False, base=JobTask, bind=True, max_retries=None,
              **retry_storage)
    def store(self, job_id):
        lifecycle.store(self.runtime.engine, self.runtime.storage, job_id)

    @app.task(name=names.SETTLE, shared=False, base=JobTask, bind=True, **retry_db)
    def settle(self, job_id):
        lifecycle.settle(self.runtime.engine, job_id)

    @app.task(name=names.FAIL_AND_REFUND, shared=False, base=JobTask, bind=True, **retry_db)
    def fail_and_refund(self, job_id):
        lifecycle.fail(self.runtime.engine, job_id, code="INTERNAL_ERROR",
                       message="A step of this job failed unexpectedly.")
