"""The generate use case driven directly on PostgreSQL, with a scripted in-process provider:
what each delivery decides (go on, stop, come back later), without a worker in sight."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from pipeline import circuits, generation, leases, lifecycle
from pipeline.db import aware_utc, insert_ignore, new_id, utcnow
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.provider import Output, Pending
from pipeline.provider_errors import RejectedError, TransientError
from pipeline.tables import job_attempts, jobs, provider_circuits, provider_keys, providers
from providers.registry import Registry
from tests.builders import make_company

pytestmark = pytest.mark.postgres


class Scripted:
    """A provider whose answers are a script: each call to start or check takes the next."""

    content_types = frozenset({"image"})

    def __init__(self, name: str, *script, instances=()):
        self.name, self.script, self._instances = name, list(script), list(instances)
        self.starts, self.checks, self.cancels, self.requests = 0, 0, [], []

    def estimate_usage(self, content_type, prompt, settings):
        return {"images": 1}

    def _next(self, request):
        self.requests.append(request)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    def start(self, request):
        self.starts += 1
        return self._next(request)

    def check(self, request, remote_id):
        self.checks += 1
        return self._next(request)

    def cancel(self, request, remote_id):
        self.cancels.append(remote_id)

    def instances(self):
        return self._instances

    def instance_of(self, remote_id):
        return remote_id.partition("|")[0]


def _png(n=1):
    return Output(b"\x89PNG fake " + bytes([n]), "image/png", "png", {"images": 1})


@pytest.fixture
def harness(pg_runtime):
    """harness(provider) -> (a runtime with only that provider, a job named for it, reserved)."""
    rt = pg_runtime
    company = make_company(rt.engine, credits=10)

    def make(provider):
        with rt.engine.begin() as conn:
            insert_ignore(conn, providers,
                          {"id": new_id(), "name": provider.name, "content_types": ["image"],
                           "pricing": {"image": {"images": "0.5"}}, "config": {}}, ["name"])
        own = dataclasses.replace(
            rt, registry=Registry({provider.name: provider}),
            settings=dataclasses.replace(rt.settings, poll_interval_seconds=0.01,
                                         stale_after_seconds=5, storage_retry_seconds=10,
                                         max_attempts=2))
        job = submit_job(own.engine, own.registry,
                         principal=Principal(company.company_id, company.user_id, None),
                         req=JobRequest("image", "a boat", {}, provider.name),
                         max_prompt_length=100)
        lifecycle.reserve(own.engine, job["id"], ttl_seconds=600)
        return own, job["id"]

    return make


def _job(rt, job_id):
    with rt.engine.connect() as conn:
        return get_job(conn, job_id)


def test_a_synchronous_output_is_stored_and_the_chain_goes_on(harness):
    provider = Scripted("sync-ok", _png())
    rt, job_id = harness(provider)
    assert generation.generate(rt, job_id) == generation.Continue()
    job = _job(rt, job_id)
    assert (job.attempts, job.output["usage"]) == (1, {"images": 1})
    assert rt.storage.size(job.output_key) == len(_png().data)
    # A second delivery finds the output and starts nothing.
    assert generation.generate(rt, job_id) == generation.Continue()
    assert provider.starts == 1


def test_a_pending_job_is_polled_later_and_never_started_twice(harness):
    provider = Scripted("async-ok", Pending("r-1", 0.2), Pending("r-1", 0.1), _png())
    rt, job_id = harness(provider)
    first = generation.generate(rt, job_id)
    assert isinstance(first, generation.Later)
    assert first.reason == "poll"
    job = _job(rt, job_id)
    assert (job.remote_id, job.progress, job.heartbeat_at) == ("r-1", 0.2, None)
    assert job.wake_at is not None
    assert job.deadline_at is not None
    assert generation.generate(rt, job_id).reason == "poll"
    assert _job(rt, job_id).progress == 0.2  # progress never goes back
    assert generation.generate(rt, job_id) == generation.Continue()
    assert (provider.starts, provider.checks, _job(rt, job_id).attempts) == (1, 2, 1)


def test_the_claim_brings_the_open_circuits_and_the_companys_sealed_key(harness):
    rt, job_id = harness(Scripted("sealed", _png()))
    for _ in range(circuits.THRESHOLD):
        circuits.record_failure(rt.engine, "elsewhere")
    job = _job(rt, job_id)
    with rt.engine.begin() as conn:
        conn.execute(provider_keys.insert().values(
            id=new_id(), company_id=job.company_id, provider="sealed", key_data="token-1",
            fingerprint="f"))
    claim = lifecycle.claim_generation(rt.engine, job_id, stale_after=60)
    assert "elsewhere" in claim.open_circuits
    assert "sealed" not in claim.open_circuits
    assert (claim.key_read, claim.sealed_key) == (True, "token-1")


def test_a_claim_reads_no_key_as_none_and_a_closed_circuit_as_absent(harness):
    rt, job_id = harness(Scripted("keyless", _png()))
    claim = lifecycle.claim_generation(rt.engine, job_id, stale_after=60)
    assert isinstance(claim.open_circuits, frozenset)
    assert "keyless" not in claim.open_circuits
    assert (claim.key_read, claim.sealed_key) == (True, None)


def test_a_circuit_open_at_the_claim_keeps_the_provider_from_being_started(harness):
    provider = Scripted("cooling", _png())
    rt, job_id = harness(provider)
    for _ in range(circuits.THRESHOLD):
        circuits.record_failure(rt.engine, "cooling")
    outcome = generation.generate(rt, job_id)
    assert isinstance(outcome, generation.Later)
    assert (outcome.reason, provider.starts, _job(rt, job_id).attempts) == ("retry", 0, 0)
    # It comes back as the circuit closes (not every second or two of the cooldown),
    # and the sweeper's wake-up agrees.
    cooldown, spread = circuits.COOLDOWN_SECONDS, generation.REOPEN_SPREAD_SECONDS
    assert cooldown - 5 < outcome.countdown <= cooldown + spread
    wake_in = (aware_utc(_job(rt, job_id).wake_at) - utcnow()).total_seconds()
    assert abs(wake_in - outcome.countdown) < 2


def test_a_job_waiting_on_instances_comes_back_when_the_first_closes(harness):
    provider = Scripted("pair", _png(), instances=["http://gpu-a", "http://gpu-b"])
    rt, job_id = harness(provider)
    keys = [circuits.instance_key("pair", url) for url in provider.instances()]
    with rt.engine.begin() as conn:
        for key, seconds in zip(keys, (40, 12), strict=True):
            insert_ignore(conn, provider_circuits, {"provider": key}, ["provider"])
            conn.execute(update(provider_circuits).where(provider_circuits.c.provider == key)
                         .values(opened_until=utcnow() + timedelta(seconds=seconds)))
    assert 10 < circuits.closes_in(rt.engine, keys) <= 12
    assert circuits.closes_in(rt.engine, [*keys, "pair@http://gpu-c"]) == 0  # one is closed
    outcome = generation.generate(rt, job_id)
    assert isinstance(outcome, generation.Later)
    assert provider.starts == 0
    assert 10 < outcome.countdown <= 12 + generation.REOPEN_SPREAD_SECONDS


def test_the_failure_that_opens_the_circuit_falls_back_in_the_same_delivery(pg_runtime):
    """The circuits the claim read are for the start; after a failed call they are read
    again, so the failure that opens a circuit moves its job on at once."""
    rt = pg_runtime
    company = make_company(rt.engine, credits=10)
    down, up = Scripted("route-down", TransientError("down")), Scripted("route-up", _png())
    with rt.engine.begin() as conn:
        for name in (down.name, up.name):
            insert_ignore(conn, providers,
                          {"id": new_id(), "name": name, "content_types": ["image"],
                           "pricing": {"image": {"images": "0.5"}}, "config": {}}, ["name"])
    routes = {**rt.settings.provider_env, "ROUTE_IMAGE": f"{down.name},{up.name}"}
    own = dataclasses.replace(
        rt, registry=Registry({down.name: down, up.name: up}),
        settings=dataclasses.replace(rt.settings, provider_env=routes, max_attempts=5))
    job = submit_job(own.engine, own.registry,
                     principal=Principal(company.company_id, company.user_id, None),
                     req=JobRequest("image", "a boat", {}), max_prompt_length=100,
                     routes=routes)
    assert job["provider"] == down.name
    lifecycle.reserve(own.engine, job["id"], ttl_seconds=600)
    for _ in range(circuits.THRESHOLD - 1):
        circuits.record_failure(own.engine, down.name)
    outcome = generation.generate(own, job["id"])  # its failure is the one that opens it
    assert (outcome.reason, _job(own, job["id"]).provider) == ("fallback", up.name)
    assert down.starts == 1


def test_the_output_record_closes_the_attempt_and_resets_the_circuit(harness):
    rt, job_id = harness(Scripted("recovered", _png()))
    for _ in range(circuits.THRESHOLD - 1):  # failing, not yet open
        circuits.record_failure(rt.engine, "recovered")
    assert generation.generate(rt, job_id) == generation.Continue()
    with rt.engine.connect() as conn:
        attempt = conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)).one()
        failures = conn.execute(select(provider_circuits.c.consecutive_failures).where(
            provider_circuits.c.provider == "recovered")).scalar_one()
    assert (attempt.number, attempt.outcome, failures) == (1, "succeeded", 0)
    assert attempt.finished_at is not None


def test_a_claimed_job_is_busy_for_another_delivery(harness):
    rt, job_id = harness(Scripted("busy", _png()))
    assert lifecycle.claim_generation(rt.engine, job_id, stale_after=60) is not None
    assert generation.generate(rt, job_id) == generation.Stop("busy")


def test_past_its_deadline_a_remote_job_is_cancelled_and_the_job_refunded(harness):
    provider = Scripted("async-slow", Pending("r-9"), Pending("r-9"))
    rt, job_id = harness(provider)
    assert generation.generate(rt, job_id).reason == "poll"
    with rt.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id)
                     .values(deadline_at=utcnow() - timedelta(seconds=1)))
    assert generation.generate(rt, job_id) == generation.Stop("PROVIDER_TIMEOUT")
    assert provider.cancels == ["r-9"]
    job = _job(rt, job_id)
    assert (job.status, job.error_code) == ("failed", "PROVIDER_TIMEOUT")


def test_a_refusal_fails_the_job_at_once(harness):
    rt, job_id = harness(Scripted("refuses", RejectedError("no boats", provider="x")))
    assert generation.generate(rt, job_id) == generation.Stop("PROVIDER_REJECTED")
    with rt.engine.connect() as conn:
        outcome = conn.execute(select(job_attempts.c.outcome)
                               .where(job_attempts.c.job_id == job_id)).scalar_one()
    assert outcome == "failed"


def test_transient_failures_retry_then_give_up_without_falling_back_when_pinned(harness):
    busy = TransientError("busy", retry_after=2.0)
    rt, job_id = harness(Scripted("flaky", busy, busy))
    first = generation.generate(rt, job_id)
    assert (first.reason, first.queue) == ("retry", None)
    assert first.countdown >= 2.0  # never sooner than the provider asked
    assert generation.generate(rt, job_id) == generation.Stop("PROVIDER_UNAVAILABLE")
    assert _job(rt, job_id).provider == "flaky"


def test_a_dead_worker_is_taken_over_and_its_start_counted(harness):
    provider = Scripted("taken-over", _png())
    rt, job_id = harness(provider)
    claim = lifecycle.claim_generation(rt.engine, job_id, stale_after=5)
    assert claim.fresh_start
    with rt.engine.begin() as conn:  # the first worker's heartbeat stopped long ago
        conn.execute(update(jobs).where(jobs.c.id == job_id)
                     .values(heartbeat_at=utcnow() - timedelta(seconds=30)))
    assert generation.generate(rt, job_id) == generation.Continue()


def test_a_job_waits_for_a_free_instance_without_counting_an_attempt(harness):
    provider = Scripted("gpu", _png(), instances=["http://a", "http://b"])
    rt, job_id = harness(provider)
    # Every slot of both instances (COMFYUI_PROMPTS_PER_INSTANCE each) holds another job.
    slots = leases.slots(["http://a", "http://b"], rt.settings.comfyui_prompts_per_instance)
    others = {slot: new_id() for slot in slots}
    for slot, other in others.items():
        assert leases.acquire(rt.engine, [slot], other, ttl_seconds=60) == slot
    waiting = generation.generate(rt, job_id)
    assert waiting.reason == "capacity"
    assert (_job(rt, job_id).attempts, provider.starts) == (0, 0)
    freed = slots[-1]  # the last slot of http://b
    leases.release(rt.engine, freed, others[freed])
    assert generation.generate(rt, job_id) == generation.Continue()
    assert provider.requests[-1].instance == "http://b"
    with rt.engine.connect() as conn:  # the lease went back when the job was done
        assert freed not in leases.holders(conn, slots)
        assert len(leases.holders(conn, slots)) == len(slots) - 1


def test_storage_trouble_is_waited_out_and_the_provider_never_asked_again(harness):
    provider = Scripted("stored-late", _png())
    rt, job_id = harness(provider)

    class Flaky:
        def __init__(self, inner, failures):
            self.inner, self.failures = inner, failures

        def put(self, key, data, content_type):
            if self.failures:
                self.failures -= 1
                from pipeline.storage import StorageUnavailable
                raise StorageUnavailable("SlowDown", code="SlowDown")
            return self.inner.put(key, data, content_type)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    rt = dataclasses.replace(rt, storage=Flaky(rt.storage, 2))
    assert generation.generate(rt, job_id) == generation.Continue()
    assert provider.starts == 1
    assert _job(rt, job_id).output_key is not None
