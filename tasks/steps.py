"""The chain's tasks. Each turns its message (a job id) into one use-case call.

Ending a chain early is `Ignore`: the message is acknowledged, nothing more runs,
and the job row already says why.
"""

from __future__ import annotations

import logging
import random
import time

from celery.exceptions import Ignore, SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from pipeline import circuits, ledger, lifecycle, provider_keys, routing
from pipeline.budgets import BudgetExceeded
from pipeline.errors import InsufficientCredits, PipelineError
from pipeline.jobs import get_job
from pipeline.pricing import PriceTable
from pipeline.provider import GenerationRequest, Pending
from pipeline.provider_errors import ProviderError, TransientError
from providers.registry import KEYED
from tasks import names
from tasks.base import JobTask

log = logging.getLogger("pipeline.tasks")

# Providers polled inside the task, keeping the worker slot: the slot is the GPU.
SLOT_HOLDING = frozenset({"comfyui"})
# Provider errors that need an operator (top up the account, fix the key), not a retry.
OPERATOR_CODES = frozenset({"PROVIDER_QUOTA_EXHAUSTED", "PROVIDER_AUTH_FAILED",
                            "PROVIDER_KEY_UNREADABLE", "PROVIDER_NOT_CONFIGURED"})
MAX_BACKOFF_SECONDS = 120.0


def backoff(retries: int, retry_after: float | None) -> float:
    """Exponential with full jitter, but never sooner than the provider asked."""
    delay = random.uniform(0, min(MAX_BACKOFF_SECONDS, 2.0 ** (retries + 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF_SECONDS * 5)


def credentials_for(runtime, job) -> dict[str, str]:
    """The secret for a job's provider: the company's own key first, else the platform's.

    Never logged, never stored on the job, never sent through the broker.
    """
    key = None
    if job.provider in KEYED:
        key = provider_keys.lookup(runtime.engine,
                                   provider_keys.cipher(runtime.settings.provider_key_secrets),
                                   job.company_id, job.provider)
    key = key or runtime.settings.provider_env.get(f"{job.provider.upper()}_API_KEY")
    return {"api_key": key} if key else {}


def load_request(runtime, job_id):
    with runtime.engine.connect() as conn:
        job = get_job(conn, job_id)
    request = GenerationRequest(
        job_id=str(job.id),
        content_type=job.content_type,
        prompt=job.prompt,
        settings=dict(job.settings or {}),
        credentials=credentials_for(runtime, job),
    )
    return job, runtime.registry.get(job.provider), request


def run_provider(runtime, job_id, provider, request, remote_id: str | None):
    """Start (or poll) the provider; a finished output goes straight to storage.

    SaaS providers that answer Pending hand the job back (the task polls later, holding
    no worker slot). GPU providers are polled here: on the gpu queue the worker slot
    stands for the GPU, so one slot per instance keeps each instance to one job.
    """
    outcome = provider.check(request, remote_id) if remote_id else provider.start(request)
    while isinstance(outcome, Pending) and provider.name in SLOT_HOLDING:
        lifecycle.heartbeat(runtime.engine, job_id, remote_id=outcome.remote_id,
                            progress=outcome.progress)
        time.sleep(runtime.settings.poll_interval_seconds)
        outcome = provider.check(request, outcome.remote_id)
    if isinstance(outcome, Pending):
        return outcome
    lifecycle.save_output(runtime.engine, runtime.storage, job_id, outcome)
    return None


def cancel_remote(runtime, job_id, remote_id: str | None = None) -> None:
    """Best effort: stop the provider's work for a job we gave up on.

    The remote id is read back from the job when not given: a GPU job saves it while
    the task polls, after the claim that started the task was taken.
    """
    try:
        job, provider, request = load_request(runtime, job_id)
        remote_id = remote_id or job.remote_id
        if remote_id:
            provider.cancel(request, remote_id)
    except ProviderError as exc:
        log.warning("job %s: could not cancel remote work: %s", job_id, exc.message)


def try_fallback(runtime, job_id) -> str | None:
    """Move the job to the next provider in its route that fits the hold; its queue, or None."""
    with runtime.engine.connect() as conn:
        job = get_job(conn, job_id)
        hold = ledger.get_hold(conn, job_id)
        if hold is None:
            return None
        target = routing.fallback(conn, runtime.registry, runtime.settings.provider_env, job,
                                  hold_amount=hold.amount, prices=PriceTable.from_db(conn))
    if not target:
        return None
    queue = runtime.registry.queue_for(target)
    if lifecycle.switch_provider(runtime.engine, job_id, from_provider=job.provider,
                                 to_provider=target, to_queue=queue):
        log.warning("job %s: falling back from %s to %s", job_id, job.provider, target)
        return queue
    return None


def fail_refused(rt, job, claim, exc) -> None:
    """Rejected input, content filtered, quota, auth, an unreadable company key:
    retrying cannot help. Quota and auth are the operators' to fix, so they log as errors.
    """
    level = logging.ERROR if exc.code in OPERATOR_CODES else logging.INFO
    log.log(level, "job %s: %s refused it: %s", job.id, job.provider, exc.code)
    lifecycle.finish_attempt(rt.engine, job.id, claim.attempts, outcome="failed",
                             error_code=exc.code, error=exc.message)
    lifecycle.fail(rt.engine, job.id, code=exc.code, message=exc.message)


def handle_transient(task, job, claim, message: str, retry_after: float | None):
    """Retry later on the same provider, fall back to the next one, or give up."""
    rt = task.runtime
    lifecycle.finish_attempt(rt.engine, job.id, claim.attempts, outcome="transient",
                             error_code="PROVIDER_UNAVAILABLE", error=message)
    lifecycle.release_claim(rt.engine, job.id)
    exhausted = claim.on_provider >= rt.settings.max_attempts
    with rt.engine.connect() as conn:
        # Read now, not at claim time: any worker may have opened the circuit meanwhile.
        cooling = job.provider in circuits.open_providers(conn)
    if exhausted or cooling:
        queue = try_fallback(rt, job.id)
        if queue:
            raise task.retry(countdown=0, queue=queue, routing_key=queue,
                             max_retries=rt.settings.max_attempts + 5)
    if exhausted:
        lifecycle.fail(rt.engine, job.id, code="PROVIDER_UNAVAILABLE",
                       message=f"{message} (gave up after {claim.attempts} tries)")
        raise Ignore()
    log.warning("job %s: transient provider error (%s), retrying", job.id, message)
    raise task.retry(countdown=backoff(task.request.retries, retry_after),
                     max_retries=rt.settings.max_attempts + 5)


def run_generate(task, job_id) -> None:
    """The generate step: claim, call the provider, then retry, fall back or finish."""
    rt = task.runtime
    claim = lifecycle.claim_generation(rt.engine, job_id,
                                       stale_after=rt.settings.stale_after_seconds)
    if claim.action == "skip":
        if claim.remote_id:
            cancel_remote(rt, job_id, claim.remote_id)  # the job ended while it ran remotely
        return  # or done by an earlier delivery: store and settle find their work
    if claim.action == "busy":
        raise Ignore()  # alive in another worker; the sweeper re-drives it if that dies
    if claim.on_provider > rt.settings.max_attempts:
        # Redeliveries count too (a worker killed mid-call): Celery has no such cap.
        lifecycle.fail(rt.engine, job_id, code="TOO_MANY_ATTEMPTS",
                       message=f"Gave up after {claim.on_provider - 1} attempts.")
        raise Ignore()
    job, provider, request = load_request(rt, job_id)
    with rt.engine.connect() as conn:
        cooling = job.provider in circuits.open_providers(conn)
    if cooling and not claim.remote_id:
        handle_transient(task, job, claim, f"{job.provider} is cooling down", None)
    try:
        pending = run_provider(rt, job_id, provider, request, claim.remote_id)
    except TransientError as exc:
        if circuits.record_failure(rt.engine, job.provider):
            log.error("circuit opened for provider %s", job.provider)
        handle_transient(task, job, claim, exc.message, exc.retry_after)
    except (ProviderError, PipelineError) as exc:
        fail_refused(rt, job, claim, exc)
        raise Ignore() from None
    except SoftTimeLimitExceeded:
        cancel_remote(rt, job_id)
        lifecycle.finish_attempt(rt.engine, job_id, claim.attempts, outcome="timeout")
        lifecycle.fail(rt.engine, job_id, code="PROVIDER_TIMEOUT",
                       message="The provider took longer than the step's time limit.")
        raise Ignore() from None
    if pending is not None:
        # The remote id is saved before anything else can fail, so a restarted
        # worker polls the same remote job instead of submitting a new one.
        lifecycle.release_claim(rt.engine, job_id, remote_id=pending.remote_id,
                                progress=pending.progress)
        raise task.retry(countdown=rt.settings.poll_interval_seconds, max_retries=None)
    circuits.record_success(rt.engine, job.provider)
    lifecycle.finish_attempt(rt.engine, job_id, claim.attempts, outcome="succeeded")


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

    @app.task(name=names.GENERATE, shared=False, base=JobTask, bind=True,
              soft_time_limit=300, time_limit=330, **retry_db)
    def generate(self, job_id):
        run_generate(self, job_id)

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
