"""The chain's tasks. Each turns its message (a job id) into one use-case call.

Ending a chain early is `Ignore`: the message is acknowledged, nothing more runs,
and the job row already says why.
"""

from __future__ import annotations

import logging
import random

from celery.exceptions import Ignore, SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from pipeline import lifecycle
from pipeline.budgets import BudgetExceeded
from pipeline.errors import InsufficientCredits
from pipeline.jobs import get_job
from providers.base import GenerationRequest, Pending
from providers.errors import ProviderError, TransientError
from tasks import names
from tasks.base import JobTask

log = logging.getLogger("pipeline.tasks")

POLL_SECONDS = 3.0
MAX_BACKOFF_SECONDS = 120.0


def backoff(retries: int, retry_after: float | None) -> float:
    """Exponential with full jitter, but never sooner than the provider asked."""
    delay = random.uniform(0, min(MAX_BACKOFF_SECONDS, 2.0 ** (retries + 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF_SECONDS * 5)


def credentials_for(runtime, job) -> dict[str, str]:
    """The secret for a job's provider: never logged, never stored on the job."""
    key = runtime.settings.provider_env.get(f"{job.provider.upper()}_API_KEY")
    return {"api_key": key} if key else {}


def run_provider(runtime, job_id, remote_id: str | None):
    """Start (or poll) the provider; a finished output goes straight to storage."""
    with runtime.engine.connect() as conn:
        job = get_job(conn, job_id)
    provider = runtime.registry.get(job.provider)
    request = GenerationRequest(
        job_id=str(job.id),
        content_type=job.content_type,
        prompt=job.prompt,
        settings=dict(job.settings or {}),
        credentials=credentials_for(runtime, job),
    )
    outcome = provider.check(request, remote_id) if remote_id else provider.start(request)
    if isinstance(outcome, Pending):
        return outcome
    lifecycle.save_output(runtime.engine, runtime.storage, job_id, outcome)
    return None


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

    @app.task(name=names.GENERATE, shared=False, base=JobTask, bind=True, soft_time_limit=300,
              time_limit=330, **retry_db)
    def generate(self, job_id):
        rt = self.runtime
        claim = lifecycle.claim_generation(rt.engine, job_id,
                                           stale_after=rt.settings.stale_after_seconds)
        if claim.action == "skip":
            return  # done by an earlier delivery: store and settle find their work
        if claim.action == "busy":
            raise Ignore()  # alive in another worker; the sweeper re-drives it if that dies
        if claim.attempts > rt.settings.max_attempts:
            lifecycle.fail(rt.engine, job_id, code="TOO_MANY_ATTEMPTS",
                           message=f"Gave up after {claim.attempts - 1} attempts.")
            raise Ignore()
        try:
            pending = run_provider(rt, job_id, claim.remote_id)
        except TransientError as exc:
            lifecycle.release_claim(rt.engine, job_id)
            if self.request.retries >= rt.settings.max_attempts:
                lifecycle.fail(rt.engine, job_id, code=exc.code,
                               message=f"{exc.message} (gave up after {claim.attempts} tries)")
                raise Ignore() from None
            log.warning("job %s: transient provider error (%s), retrying", job_id, exc.message)
            raise self.retry(countdown=backoff(self.request.retries, exc.retry_after),
                             max_retries=rt.settings.max_attempts) from None
        except ProviderError as exc:
            lifecycle.fail(rt.engine, job_id, code=exc.code, message=exc.message)
            raise Ignore() from None
        except SoftTimeLimitExceeded:
            lifecycle.fail(rt.engine, job_id, code="PROVIDER_TIMEOUT",
                           message="The provider took longer than the step's time limit.")
            raise Ignore() from None
        if pending is not None:
            # The remote id is saved before anything else can fail, so a restarted
            # worker polls the same remote job instead of submitting a new one.
            lifecycle.release_claim(rt.engine, job_id, remote_id=pending.remote_id)
            raise self.retry(countdown=POLL_SECONDS, max_retries=None)

    @app.task(name=names.STORE, shared=False, base=JobTask, bind=True, **retry_db)
    def store(self, job_id):
        lifecycle.store(self.runtime.engine, self.runtime.storage, job_id)

    @app.task(name=names.SETTLE, shared=False, base=JobTask, bind=True, **retry_db)
    def settle(self, job_id):
        lifecycle.settle(self.runtime.engine, job_id)

    @app.task(name=names.FAIL_AND_REFUND, shared=False, base=JobTask, bind=True, **retry_db)
    def fail_and_refund(self, job_id):
        lifecycle.fail(self.runtime.engine, job_id, code="INTERNAL_ERROR",
                       message="A step of this job failed unexpectedly.")
