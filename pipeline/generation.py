"""The generate step as one use case: claim the job, start or poll its provider, store the
output, and say what should happen next.

The Celery task only maps the returned outcome onto its own words: `Continue` (the chain
goes on to store), `Stop` (the chain ends; the job row says why) and `Later` (run this step
again in `countdown` seconds, on `queue` when the job moved to another provider). Celery's
retry counter is never a poll or attempt counter here: polls are bounded by the provider's
deadline (`deadline_at`, set when the remote work starts), provider starts by `jobs.attempts`.

One remote start per job: the claim decides start versus poll in the statement that takes
it, a heartbeat thread keeps the claim alive while a call, an upload or a GPU poll is in
flight, and a multi-instance provider (ComfyUI) holds at most COMFYUI_PROMPTS_PER_INSTANCE
prompts per instance, each under a lease on one of its slots (one running, the rest queued
behind it at ComfyUI). A slot-holding provider that can tell when its work ends is waited
on (ComfyUI: its websocket's "prompt ended", else a GPU_POLL_SECONDS poll of our own server)
instead of sleeping a poll interval. Remote work is cancelled whenever the job ends without
using it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import OperationalError

from pipeline import (
    catalogue,
    circuits,
    leases,
    ledger,
    lifecycle,
    logcontext,
    provider_keys,
    routing,
    telemetry,
)
from pipeline.db import utcnow
from pipeline.errors import PipelineError
from pipeline.heartbeat import Heartbeat
from pipeline.jobs import get_job
from pipeline.pricing import PriceTable
from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import ProviderError, TransientError
from pipeline.tables import TERMINAL_STATUSES

log = logging.getLogger("pipeline.generation")

# Provider errors that need an operator (top up the account, fix the key), not a retry.
OPERATOR_CODES = frozenset({"PROVIDER_QUOTA_EXHAUSTED", "PROVIDER_AUTH_FAILED",
                            "PROVIDER_KEY_UNREADABLE", "PROVIDER_NOT_CONFIGURED"})
MAX_BACKOFF_SECONDS = 120.0
STORAGE_BACKOFF_MAX = 30.0
# The jobs that waited out an open circuit come back over this many seconds after it closes.
REOPEN_SPREAD_SECONDS = 5.0


@dataclass(frozen=True)
class Continue:
    """The output is in storage (now or by an earlier delivery): go on to store and settle,
    in this task when `here` (the provider's catalogue entry: finishes_in_place)."""

    here: bool = False

    @classmethod
    def after(cls, provider: str) -> Continue:
        """Go on after this provider's output: here when its catalogue entry says so."""
        return cls(here=catalogue.info_for(provider).finishes_in_place)


@dataclass(frozen=True)
class Stop:
    """End the chain here; the job row already says why (or another delivery holds it)."""

    reason: str


@dataclass(frozen=True)
class Later:
    """Run the generate step again in `countdown` seconds, on `queue` if it changed."""

    countdown: float
    reason: str  # "poll", "retry", "capacity", "fallback", "storage"
    queue: str | None = None


Outcome = Continue | Stop | Later


def backoff(tries: int, retry_after: float | None) -> float:
    """Exponential with full jitter, but never sooner than the provider asked."""
    delay = random.uniform(0, min(MAX_BACKOFF_SECONDS, 2.0 ** (tries + 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF_SECONDS * 5)


def credentials_for(rt, job, claim: lifecycle.Claim | None = None) -> dict[str, str]:
    """The secret for a job's provider: the company's own key first, else the platform's.
    A claim that read the company's key brings it (sealed); else it is read here.

    Never logged, never stored on the job, never sent through the broker.
    """
    key = None
    if job.provider in catalogue.KEYED:
        cipher = provider_keys.cipher(rt.settings.provider_key_secrets)
        if claim is not None and claim.key_read:
            key = provider_keys.unseal(cipher, claim.sealed_key, job.company_id, job.provider)
        else:
            key = provider_keys.lookup(rt.engine, cipher, job.company_id, job.provider)
    key = key or rt.settings.provider_env.get(f"{job.provider.upper()}_API_KEY")
    logcontext.never_log(key)  # scrubbed from any line, should a vendor's error echo it
    return {"api_key": key} if key else {}


def request_for(rt, job, instance: str | None = None,
                claim: lifecycle.Claim | None = None) -> GenerationRequest:
    return GenerationRequest(job_id=str(job.id), content_type=job.content_type,
                             prompt=job.prompt, settings=dict(job.settings or {}),
                             credentials=credentials_for(rt, job, claim), instance=instance)


def _load(engine, job_id):
    with engine.connect() as conn:
        return get_job(conn, job_id)


class _Run:
    """One delivery of the generate step for one job: the state its helpers share."""

    def __init__(self, rt, claim: lifecycle.Claim):
        self.rt, self.job, self.claim = rt, claim.job, claim
        self.settings = rt.settings
        self.provider = rt.registry.get(self.job.provider)
        self.info = catalogue.info_for(self.job.provider)
        self.lease: str | None = None
        self.attempt = claim.attempts  # a poll's attempt is the one that started the work
        self.on_provider = 0
        self.remote_id = claim.remote_id
        self.deadline_at = claim.deadline_at

    # --- pieces --------------------------------------------------------------------------

    @property
    def engine(self):
        return self.rt.engine

    @property
    def instance(self) -> str | None:
        """The instance the leased slot belongs to."""
        return leases.instance_of(self.lease) if self.lease is not None else None

    def slots(self, instances: list[str]) -> list[str]:
        return leases.slots(instances, self.settings.comfyui_prompts_per_instance)

    def circuit_key(self) -> str:
        if self.lease is not None:
            return circuits.instance_key(self.job.provider, self.instance)
        return self.job.provider

    def open_circuits(self, *, fresh: bool = False) -> set[str] | frozenset[str]:
        """The open circuits: before the call, as the claim read them (on PostgreSQL);
        `fresh` after it, when this call's failure, or another worker's, may have opened
        one since."""
        if self.claim.open_circuits is not None and not fresh:
            return self.claim.open_circuits
        with self.engine.connect() as conn:
            return circuits.open_providers(conn)

    def healthy_instances(self) -> list[str]:
        cooling = self.open_circuits()
        return [i for i in self.rt.registry.instances(self.job.provider)
                if circuits.instance_key(self.job.provider, i) not in cooling]

    def past_deadline(self) -> bool:
        return self.deadline_at is not None and utcnow() >= self.deadline_at

    def cancel_remote(self, request: GenerationRequest) -> None:
        if self.remote_id:
            _cancel(self.provider, request, self.remote_id)

    def fail(self, code: str, message: str) -> Stop:
        lifecycle.fail(self.engine, self.job.id, code=code, message=message)
        return Stop(code)

    def finish_attempt(self, outcome: str, code: str | None = None,
                       message: str | None = None) -> None:
        if self.attempt:
            lifecycle.finish_attempt(self.engine, self.job.id, self.attempt, outcome=outcome,
                                     error_code=code, error=message, remote_id=self.remote_id)

    def ask(self, operation: str, *args):
        """The provider's start or check, timed and counted for the metrics."""
        return telemetry.provider_call(self.job.provider, operation,
                                       getattr(self.provider, operation), *args)

    def release_lease(self) -> None:
        if self.lease is not None:
            leases.release(self.engine, self.lease, self.job.id)

    # --- the step ------------------------------------------------------------------------

    def run(self) -> Outcome:
        if self.claim.fresh_start:
            stopped = self.prepare_start()
            if stopped is not None:
                return stopped
        elif self.rt.registry.instances(self.job.provider):
            # Polling a prompt already on an instance: it keeps one of that instance's slots.
            instance = self.provider.instance_of(self.remote_id)
            self.lease = leases.acquire(self.engine, self.slots([instance]), self.job.id,
                                        ttl_seconds=self.settings.stale_after_seconds)
        request = request_for(self.rt, self.job, self.instance, self.claim)
        try:
            with Heartbeat(self.engine, self.job.id, lease=self.lease,
                           stale_after_seconds=self.settings.stale_after_seconds) as beat:
                return self.call(request, beat)
        finally:
            self.release_lease()

    def prepare_start(self) -> Outcome | None:
        """Before a fresh start: an instance lease where needed, then count the attempt."""
        job, settings = self.job, self.settings
        if self.rt.registry.instances(job.provider):
            healthy = self.healthy_instances()
            if not healthy:
                return self.transient(f"every {job.provider} instance is cooling down", None,
                                      counted=False)
            self.lease = leases.acquire(self.engine, self.slots(healthy), job.id,
                                        ttl_seconds=settings.stale_after_seconds)
            if self.lease is None:
                # Every slot holds another job: wait for one, without counting an attempt.
                lifecycle.release_claim(self.engine, job.id,
                                        wake_in=settings.poll_interval_seconds)
                return Later(settings.poll_interval_seconds, "capacity")
        elif job.provider in self._cooling():
            return self.transient(f"{job.provider} is cooling down", None, counted=False)
        self.deadline_at = utcnow() + timedelta(
            seconds=catalogue.deadline_for(job.provider, settings.provider_env))
        self.attempt, self.on_provider = lifecycle.begin_attempt(
            self.engine, job.id, job.provider, deadline_at=self.deadline_at)
        if self.on_provider > settings.max_attempts:
            self.release_lease()
            return self.fail("TOO_MANY_ATTEMPTS",
                             f"Gave up after {self.on_provider - 1} attempts on {job.provider}.")
        log.info("starting %s (attempt %d), prompt of %d characters", job.provider,
                 self.attempt, len(job.prompt))
        return None

    def _cooling(self, *, fresh: bool = False) -> set[str]:
        return routing.cooling_among(self.open_circuits(fresh=fresh), self.rt.registry)

    def call(self, request: GenerationRequest, beat: Heartbeat) -> Outcome:
        """Start or poll the provider; hold the slot and poll here for GPU providers."""
        try:
            if self.claim.fresh_start:
                outcome = self.ask("start", request)
            else:
                outcome = self.ask("check", request, self.remote_id)
            if isinstance(outcome, Pending):
                self.remote_id = outcome.remote_id
                if not self.info.holds_slot:
                    return self.poll_later(request, outcome)
                outcome = self.poll_here(request, outcome, beat)
                if not isinstance(outcome, Output):
                    return outcome
        except TransientError as exc:
            if circuits.record_failure(self.engine, self.circuit_key()):
                log.error("circuit opened for %s", self.circuit_key())
            return self.transient(exc.message, exc.retry_after, request=request)
        except (ProviderError, PipelineError) as exc:
            return self.refused(request, exc)
        except OperationalError:
            raise  # the database blinked: the task retries this step, the remote work goes on
        except Exception:
            # A bug, or the task's time limit: the remote work must not outlive the job.
            self.cancel_remote(request)
            raise
        return self.store(request, outcome, beat)

    def poll_here(self, request: GenerationRequest, outcome: Output | Pending,
                  beat: Heartbeat) -> Output | Stop:
        """On the gpu queue the worker slot stands for the GPU: poll here, beating, until
        the output comes, the deadline passes, or the job ends elsewhere."""
        while isinstance(outcome, Pending):
            self.remote_id = outcome.remote_id
            if not beat.now(remote_id=outcome.remote_id, progress=outcome.progress):
                return self.ended_elsewhere(request)
            if self.past_deadline():
                return self.timed_out(request)
            self.wait(request, outcome.remote_id, beat)
            if beat.ended.is_set():
                return self.ended_elsewhere(request)
            outcome = self.ask("check", request, outcome.remote_id)
        return outcome

    def wait(self, request: GenerationRequest, remote_id: str, beat: Heartbeat) -> None:
        """Until the remote work may have changed: the provider says when if it can (a
        push from its server, else its own short poll of GPU_POLL_SECONDS), else a poll
        interval."""
        settings = self.settings
        waiter = getattr(self.provider, "wait", None)
        if waiter is None:
            beat.wait(settings.poll_interval_seconds)
            return
        try:
            waiter(request, remote_id, settings.poll_interval_seconds,
                   fallback=settings.gpu_poll_seconds, stop=beat.ended)
        except Exception as exc:  # a hint failed: poll as before, never fail the job on it
            log.debug("job %s: provider wait failed: %s", self.job.id, exc)
            beat.wait(settings.gpu_poll_seconds)

    def poll_later(self, request: GenerationRequest, pending: Pending) -> Outcome:
        """An asynchronous SaaS job still running: hand the slot back, poll again later."""
        if self.past_deadline():
            return self.timed_out(request)
        if not lifecycle.release_claim(self.engine, self.job.id, remote_id=pending.remote_id,
                                       progress=pending.progress,
                                       wake_in=self.settings.poll_interval_seconds):
            # Ended while the call ran (a cancel during the start): the row may never have
            # heard of this remote id, so no later delivery could stop the work. Stop it now.
            return self.ended_elsewhere(request)
        return Later(self.settings.poll_interval_seconds, "poll")

    def ended_elsewhere(self, request: GenerationRequest) -> Stop:
        """The job ended while it ran (its hold expired, it was cancelled): stop the work."""
        self.cancel_remote(request)
        self.finish_attempt("abandoned")
        return Stop("ended")

    def timed_out(self, request: GenerationRequest) -> Stop:
        self.cancel_remote(request)
        self.finish_attempt("timeout", "PROVIDER_TIMEOUT")
        seconds = catalogue.deadline_for(self.job.provider, self.settings.provider_env)
        return self.fail("PROVIDER_TIMEOUT",
                         f"{self.job.provider} did not finish within {seconds} s; "
                         "its remote work was cancelled.")

    def refused(self, request: GenerationRequest, exc: ProviderError | PipelineError) -> Stop:
        """Rejected input, content filtered, quota, auth, an unreadable key: retrying cannot
        help. Quota and auth are the operators' to fix, so they log as errors."""
        level = logging.ERROR if exc.code in OPERATOR_CODES else logging.INFO
        log.log(level, "job %s: %s refused it: %s", self.job.id, self.job.provider, exc.code)
        self.cancel_remote(request)
        self.finish_attempt("failed", exc.code, exc.message)
        return self.fail(exc.code, exc.message)

    def transient(self, message: str, retry_after: float | None, *, counted: bool = True,
                  request: GenerationRequest | None = None) -> Outcome:
        """Retry later on the same provider, fall back to the next one, or give up.

        A failed poll keeps its remote id and is retried until the deadline: the remote
        job may well be running. A failed start counts against MAX_ATTEMPTS.
        """
        job, settings = self.job, self.settings
        if counted:
            self.finish_attempt("transient", "PROVIDER_UNAVAILABLE", message)
        self.release_lease()
        if self.remote_id:  # only a poll has one, and a poll always passes its request
            if self.past_deadline():
                return self.timed_out(request)
            delay = backoff(1, retry_after)
            lifecycle.release_claim(self.engine, job.id, wake_in=delay)
            return Later(delay, "retry")
        exhausted = self.on_provider >= settings.max_attempts
        # Read only when it can matter: an exhausted job falls back or fails either way.
        cooling = not exhausted and job.provider in self._cooling(fresh=True)
        if exhausted or cooling:
            queue = self.fall_back()
            if queue:
                return Later(0, "fallback", queue)
        if exhausted:
            return self.fail("PROVIDER_UNAVAILABLE",
                             f"{message} (gave up after {self.on_provider} tries)")
        delay = backoff(self.on_provider, retry_after)
        if cooling:
            # Nothing is asked of it before its circuit closes: one wake-up then, not one
            # every second or two of the cooldown (each a claim, a release and a retry).
            delay = max(delay, self.until_closed())
        log.warning("job %s: transient provider error (%s), retrying in %.1f s", job.id,
                    message, delay)
        lifecycle.release_claim(self.engine, job.id, wake_in=delay)
        return Later(delay, "retry")

    def until_closed(self) -> float:
        """Seconds until the job's provider takes calls again (any one of its instances),
        plus up to REOPEN_SPREAD_SECONDS, so the jobs that waited do not all call at once."""
        provider = self.job.provider
        keys = [circuits.instance_key(provider, instance)
                for instance in self.rt.registry.instances(provider)] or [provider]
        return circuits.closes_in(self.engine, keys) + random.uniform(0, REOPEN_SPREAD_SECONDS)

    def fall_back(self) -> str | None:
        """Move the job to the next provider its route allows; that provider's queue."""
        job = self.job
        with self.engine.connect() as conn:
            hold = ledger.get_hold(conn, job.id)
            if hold is None:
                return None
            target = routing.fallback(conn, self.rt.registry, self.settings.provider_env, job,
                                      hold_amount=hold.amount, prices=PriceTable.from_db(conn))
        if not target:
            return None
        queue = catalogue.queue_for(target)
        if lifecycle.switch_provider(self.engine, job.id, from_provider=job.provider,
                                     to_provider=target, to_queue=queue):
            log.warning("job %s: falling back from %s to %s", job.id, job.provider, target)
            return queue
        return None

    def store(self, request: GenerationRequest, output: Output, beat: Heartbeat) -> Outcome:
        """Put an output we have (and paid for) into storage, retrying with backoff.

        The vendor is never asked again for it: storage trouble is waited out here, with
        the heartbeat running, for up to STORAGE_RETRY_SECONDS.
        """
        give_up_at = time.monotonic() + self.settings.storage_retry_seconds
        delay = 1.0
        while True:
            try:
                lifecycle.save_output(self.engine, self.rt.storage, self.job, output,
                                      lifecycle.Succeeded(self.attempt, self.remote_id,
                                                          self.circuit_key()))
                break
            except Exception as exc:
                if not getattr(exc, "retryable", False):
                    raise
                if time.monotonic() + delay > give_up_at:
                    return self.storage_exhausted(exc)
                log.warning("job %s: storage unavailable (%s); retrying in %.0f s",
                            self.job.id, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, STORAGE_BACKOFF_MAX)
        log.info("output stored: %d bytes of %s", len(output.data), output.mime_type)
        return Continue.after(self.job.provider)

    def storage_exhausted(self, exc: Exception) -> Outcome:
        """Storage stayed down. A remote job's output can be fetched again later (polling
        it is no new generation); a synchronous call's bytes cannot, so the job fails."""
        if self.remote_id:
            lifecycle.release_claim(self.engine, self.job.id, wake_in=STORAGE_BACKOFF_MAX)
            return Later(STORAGE_BACKOFF_MAX, "storage")
        self.finish_attempt("failed", "STORAGE_UNAVAILABLE", str(exc))
        return self.fail("STORAGE_UNAVAILABLE",
                         "The result could not be stored; the job was refunded.")


def generate(rt, job_id) -> Outcome:
    """The generate step for one delivery of the job's message.

    `rt` carries the engine, storage, provider registry and settings.
    """
    claim = lifecycle.claim_generation(rt.engine, job_id,
                                       stale_after=rt.settings.stale_after_seconds)
    if claim is None:  # not claimable: find out why
        job = _load(rt.engine, job_id)
        logcontext.bind_job(job)
        if job.output_key is not None:  # done by an earlier delivery: finish it
            return Continue.after(job.provider)
        if job.status in TERMINAL_STATUSES:
            if job.remote_id:  # a remote job still running for a job that ended
                _cancel_for_ended(rt, job)
            return Stop("terminal")
        return Stop("busy")  # alive in another worker; the sweeper re-drives it if that dies
    logcontext.bind_job(claim.job)
    try:
        run = _Run(rt, claim)
    except PipelineError as exc:  # the provider is no longer configured on this worker
        lifecycle.fail(rt.engine, job_id, code="PROVIDER_NOT_CONFIGURED", message=exc.message)
        return Stop("PROVIDER_NOT_CONFIGURED")
    return run.run()


def _cancel(provider, request: GenerationRequest, remote_id: str) -> None:
    """Best effort: stop the provider's work for a job that will not use it."""
    try:
        provider.cancel(request, remote_id)
    except ProviderError as exc:
        log.warning("job %s: could not cancel remote work: %s", request.job_id, exc.message)


def _cancel_for_ended(rt, job) -> None:
    """Cancel the remote work of a job that ended while it ran (read from its row)."""
    try:
        provider = rt.registry.get(job.provider)
    except PipelineError:  # no longer configured here: nothing we can reach
        log.warning("job %s: %s is not configured; its remote work is left", job.id,
                    job.provider)
        return
    _cancel(provider, request_for(rt, job), job.remote_id)


def abandon(rt, job_id, *, code: str, message: str) -> None:
    """The step was stopped from outside (a time limit): cancel remote work, fail the job."""
    job = _load(rt.engine, job_id)
    if job.remote_id and job.output_key is None:
        _cancel_for_ended(rt, job)
    lifecycle.fail(rt.engine, job_id, code=code, message=message)
