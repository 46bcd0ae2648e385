"""Fault tests through real workers: a credit race, a chaos run, and a chain delivered twice.

Each asserts outcomes in the database (job states, ledger rows, wallet balances), never
calls: whatever the interleaving, a job is charged at most once, every hold is closed,
and the wallet stays equal to the sum of its transactions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import func, select

from api import create_app
from pipeline import budgets
from pipeline.config import Settings
from pipeline.db import init_db, insert_ignore, new_id
from pipeline.tables import (
    credit_holds,
    job_attempts,
    job_dispatches,
    jobs,
    providers,
    transactions,
    wallets,
)
from service.runtime import build_runtime
from tasks.app import create_celery
from tasks.chain import CeleryPublisher, build_chain
from tasks.names import ALL_QUEUES
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    job_statuses,
    make_company,
    serving,
    wait_for,
    wait_terminal,
    wallet_of,
)
from tests.conftest import REDIS_URL, distributed_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SLOW_QUEUE = "saas.slow"  # providers.registry.queue_for("slow")
SLOW_QUEUES = (*ALL_QUEUES, SLOW_QUEUE)
SLOW_PRICE = Decimal("0.001")  # credits per token: a slow job holds 0.01

SLOW_PROVIDER = '''\
"""A test-only provider plug-in: text that takes 50-500 ms, found through an entry point.

A prompt saying "reject" is refused; one saying "flaky" fails transiently on its first call.
"""

import hashlib
import os
import random
import time
from pathlib import Path

from pipeline.provider import Output
from pipeline.provider_errors import ProviderError, RejectedError, TransientError

TOKENS = 10  # the estimate; a job reports 1 to 10
# Shared by every worker process: which flaky jobs have had their one failure.
MARKS = Path(__file__).resolve().parent.parent / "slowprov-marks"


def first_call(job_id):
    MARKS.mkdir(exist_ok=True)
    try:
        os.close(os.open(MARKS / job_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class SlowProvider:
    name = "slow"
    content_types = frozenset({"text"})

    def estimate_usage(self, content_type, prompt, settings):
        return {"tokens": TOKENS}

    def start(self, request):
        time.sleep(random.uniform(0.05, 0.5))
        if "reject" in request.prompt:
            raise RejectedError("the slow provider refuses this prompt", provider="slow")
        if "flaky" in request.prompt and first_call(request.job_id):
            raise TransientError("the slow provider is busy", provider="slow")
        # Usage comes from the job id, so a redone job reports the same; it is often
        # below the estimate, so settling also releases part of the hold.
        digest = hashlib.sha256(request.job_id.encode()).digest()
        tokens = 1 + digest[0] % TOKENS
        data = f"slow output for {request.job_id}\\n".encode()
        return Output(data=data, mime_type="text/plain; charset=utf-8", extension="txt",
                      usage={"tokens": tokens}, metadata={"provider": "slow"})

    def check(self, request, remote_id):
        raise ProviderError("the slow provider is synchronous", provider="slow")

    def cancel(self, request, remote_id):
        pass


def make(settings):
    return SlowProvider()
'''


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture
def own_database(empty_pg_database) -> str:
    """A PostgreSQL database of this test's own: the audit and the hold counts scan all of it."""
    return empty_pg_database


@pytest.fixture(scope="module")
def slow_plugin_dir(tmp_path_factory) -> Path:
    """A folder holding the `slowprov` package and its dist-info (entry point included)."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "slowprov").mkdir()
    (root / "slowprov" / "__init__.py").write_text(SLOW_PROVIDER)
    info = root / "slowprov-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slowprov\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[content_pipeline.providers]\nslow = slowprov:make\n")
    return root


@pytest.fixture
def slow_plugin(slow_plugin_dir, monkeypatch) -> Path:
    """The plug-in on this process's sys.path (the API's registry) for one test."""
    monkeypatch.syspath_prepend(str(slow_plugin_dir))
    return slow_plugin_dir


def worker_pythonpath(plugin_dir: Path) -> str:
    return os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH")) if p)


def price_slow_provider(engine) -> None:
    """The price table row a plug-in provider needs before it can be estimated or settled."""
    with engine.begin() as conn:
        insert_ignore(conn, providers,
                      {"id": new_id(), "name": "slow", "content_types": ["text"],
                       "pricing": {"text": {"tokens": str(SLOW_PRICE)}},
                       "config": {"source": "tests/test_faults.py"}},
                      ["name"])


def pipeline_runtime(env: dict):
    settings = Settings.from_env(environ=env)
    celery_app = create_celery(settings)
    rt = build_runtime(settings, publisher=CeleryPublisher(celery_app))
    init_db(rt.engine)
    return rt, celery_app


@contextmanager
def api_server(runtime):
    """The API on a real threaded HTTP server, as service/stack.py runs it."""
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one access line per request drowns the output
    try:
        with serving(create_app(runtime)) as url:
            yield url
    finally:
        werkzeug_log.setLevel(level)


def submit(url: str, key: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/v1/jobs", json=body, headers=auth(key), timeout=60)


def entries_by_job(engine, job_ids) -> dict[str, list]:
    """Every ledger row of these jobs, grouped by job id."""
    grouped: dict[str, list] = {str(j): [] for j in job_ids}
    with engine.connect() as conn:
        for row in conn.execute(select(transactions).where(transactions.c.job_id.in_(job_ids))):
            grouped[str(row.job_id)].append(row)
    return grouped


def jobs_by_id(engine, job_ids) -> dict[str, object]:
    with engine.connect() as conn:
        return {str(r.id): r for r in conn.execute(select(jobs).where(jobs.c.id.in_(job_ids)))}


def holds_by_job(engine, job_ids) -> dict[str, object]:
    with engine.connect() as conn:
        rows = conn.execute(select(credit_holds).where(credit_holds.c.job_id.in_(job_ids)))
        return {str(r.job_id): r for r in rows}


def duplicate_idempotency_keys(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(
            select(transactions.c.idempotency_key, func.count())
            .group_by(transactions.c.idempotency_key)
            .having(func.count() > 1)
        ).all()


def assert_charged_once(engine, job_ids) -> Counter:
    """Invariant 3 per job: one hold at most, posted exactly (completed) or voided (failed).

    Returns how many jobs ended in each (status, error code).
    """
    rows = jobs_by_id(engine, job_ids)
    entries = entries_by_job(engine, job_ids)
    holds = holds_by_job(engine, job_ids)
    outcomes: Counter = Counter()
    for job_id, job in rows.items():
        kinds = Counter(e.type for e in entries[job_id])
        amount = {kind: sum((e.amount for e in entries[job_id] if e.type == kind), Decimal(0))
                  for kind in ("reservation", "debit", "release", "refund")}
        hold = holds.get(job_id)
        where = f"job {job_id} ({job.status}, {job.error_code}): {dict(kinds)}"
        assert kinds["reservation"] <= 1, where
        assert kinds["debit"] <= 1, where
        assert hold is None or hold.status != "open", where
        if job.status == "completed":
            assert kinds["debit"] == 1, where
            assert amount["debit"] == job.actual_cost, where
            assert job.actual_cost <= job.estimated_cost, where
            assert hold is not None, where
            assert hold.status == "settled", where
            assert amount["debit"] + amount["release"] == amount["reservation"] == hold.amount, \
                where
            assert kinds["refund"] == 0, where
        else:
            assert job.status == "failed", where
            assert kinds["debit"] == 0, where
            assert kinds["release"] == 0, where
            assert job.actual_cost is None, where
            # Fully refunded: the hold (if one was taken) came back whole.
            assert amount["refund"] == amount["reservation"], where
            if hold is not None:
                assert hold.status == "voided", where
                assert amount["refund"] == hold.amount, where
        outcomes[(job.status, job.error_code)] += 1
    return outcomes


def run_audit(engine) -> list:
    """pipeline.audit's findings, where that module exists (another engineer writes it)."""
    if importlib.util.find_spec("pipeline.audit") is None:
        return []
    from pipeline.audit import audit

    return audit(engine)


def log_count(workers, *needles: str) -> int:
    """Worker log lines holding every one of the needles."""
    return sum(all(n in line for n in needles)
               for w in workers for line in w.log().splitlines())


# What the chaos itself makes workers log: a killed child, a broker that went away.
CHAOS_NOISE = ("SIGKILL", "WorkerLostError", "Connection refused", "Cannot connect",
               "Timed out waiting for UP message", "reason: network:ConnectionError",
               "reason:network:ConnectionError")


def error_lines(workers, limit: int = 20, *, ignore=()) -> list[str]:
    lines = [line for w in workers for line in w.log().splitlines()
             if any(mark in line for mark in ('"level": "ERROR"', '"level": "CRITICAL"',
                                             "ERROR/", "CRITICAL/"))
             and not any(noise in line for noise in ignore)]
    return lines[-limit:]


# --- 1. the race for the last credits ------------------------------------------------------


IMAGE_JOB = {"contentType": "image", "prompt": "a race for credits",
             "settings": {"width": 100, "height": 100}}
IMAGE_COST = Decimal("0.002")  # 0.01 megapixels x 0.2 credits, estimate == actual
FUNDED_JOBS = 50
SUBMISSIONS = 200


@pytest.mark.parametrize("limit", ["wallet", "budget"])
def test_concurrent_submissions_never_overdraw_the_wallet(limit, own_database, own_redis_prefix,
                                                          tmp_path, start_worker):
    """The wallet funds exactly 50 jobs, or (budget) a daily cap allows exactly 50."""
    # A publish that misses its bound under the burst (2 cores, 200 requests) leaves its
    # job pending for the outbox relay: one worker runs beat to relay it.
    env = distributed_env(tmp_path, own_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/storage", DISPATCH_GRACE_SECONDS=1,
                          SWEEP_INTERVAL_SECONDS=1)
    rt, _ = pipeline_runtime(env)
    funded = IMAGE_COST * FUNDED_JOBS
    deposit = funded if limit == "wallet" else Decimal(100)
    refusal = "INSUFFICIENT_CREDITS" if limit == "wallet" else "BUDGET_EXCEEDED"
    company = make_company(rt.engine, credits=deposit, name="racer")
    if limit == "budget":
        budgets.set_budget(rt.engine, company.company_id, period="day", cap=funded)
    # Two worker processes, so holds are taken from separate processes at the same time.
    workers = [start_worker(env, concurrency=4, beat=True), start_worker(env, concurrency=4)]

    samples: list[tuple[Decimal, Decimal]] = []
    stop = threading.Event()

    def sample_wallet():
        with rt.engine.connect() as conn:
            while not stop.is_set():
                row = conn.execute(
                    select(wallets.c.credits_available, wallets.c.credits_held)
                    .where(wallets.c.company_id == company.company_id)
                ).one()
                committed = deposit - row.credits_available  # spent + held, no other moves
                conn.rollback()
                samples.append((row.credits_available, row.credits_held, committed))
                time.sleep(0.005)

    sampler = threading.Thread(target=sample_wallet, daemon=True)
    sampler.start()
    barrier = threading.Barrier(SUBMISSIONS)

    def race(_):
        barrier.wait(timeout=60)
        return submit(url, company.api_key, IMAGE_JOB)

    try:
        with api_server(rt) as url:
            with ThreadPoolExecutor(SUBMISSIONS) as pool:
                responses = list(pool.map(race, range(SUBMISSIONS)))
            statuses = Counter(r.status_code for r in responses)
            assert set(statuses) <= {202, 402}, statuses
            refused = [r for r in responses if r.status_code == 402]
            assert {r.json()["code"] for r in refused} <= {refusal}
            accepted = [r.json()["jobId"] for r in responses if r.status_code == 202]
            assert all(Decimal(r.json()["estimatedCost"]) == IMAGE_COST
                       for r in responses if r.status_code == 202)
            wait_terminal(rt.engine, accepted, timeout=120)
            # The wallet is spent: now the fast check at submit refuses at once.
            late = submit(url, company.api_key, IMAGE_JOB)
            assert late.status_code == 402, late.text
            assert late.json()["code"] == refusal
    finally:
        stop.set()
        sampler.join(10)

    rows = jobs_by_id(rt.engine, accepted)
    completed = [j for j in rows.values() if j.status == "completed"]
    failed = [j for j in rows.values() if j.status != "completed"]
    print(f"\nrace: {SUBMISSIONS} submissions, {len(refused)} refused at submit (402), "
          f"{len(accepted)} accepted, {len(completed)} completed, {len(failed)} refused at "
          f"reserve; {len(samples)} wallet samples")
    assert len(completed) == FUNDED_JOBS, (Counter(j.status for j in rows.values()),
                                           error_lines(workers))
    assert {(j.status, j.error_code) for j in failed} <= {("failed", refusal)}
    assert len(refused) + len(failed) == SUBMISSIONS - FUNDED_JOBS
    assert all(j.actual_cost == IMAGE_COST for j in completed)

    outcomes = assert_charged_once(rt.engine, accepted)
    assert outcomes[("completed", None)] == FUNDED_JOBS
    # A job refused at reserve left no trace in the ledger: its hold rolled back whole.
    entries = entries_by_job(rt.engine, [j.id for j in failed])
    assert all(not job_entries for job_entries in entries.values())
    assert not holds_by_job(rt.engine, [j.id for j in failed])

    assert samples
    assert all(available >= 0 and held >= 0 for available, held, _ in samples)
    # Spent plus held never passed what was allowed, at any sampled instant.
    assert all(committed <= funded for _, _, committed in samples)
    wallet = wallet_of(rt.engine, company.company_id)
    assert wallet.credits_available == deposit - funded
    assert wallet.credits_held == 0
    assert wallet.credits_used == funded
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    assert not duplicate_idempotency_keys(rt.engine)
    assert run_audit(rt.engine) == []
    rt.engine.dispose()


# --- 2. killed workers and a lost broker ---------------------------------------------------


def beat_pid(worker, concurrency: int) -> int:
    """The embedded beat process among a prefork worker's children.

    Celery's beat process closes every inherited descriptor when it starts (before it
    logs "beat: Starting"), while pool children keep the pool's pipes: once it has
    started, beat is the child with by far the fewest open descriptors. Killing beat
    would stop every sweep for good, which is not the fault under test.
    """
    def fd_count(pid: int) -> int:
        try:
            return len(os.listdir(f"/proc/{pid}/fd"))
        except FileNotFoundError:
            return 10**6

    def found():
        pids = worker.child_pids()
        if "beat: Starting" not in worker.log() or len(pids) != concurrency + 1:
            return None
        counts = sorted((fd_count(pid), pid) for pid in pids)
        # Beat keeps stdio and a socket or two; a pool child holds a dozen pipes more.
        return counts[0][1] if counts[0][0] + 8 <= counts[1][0] else None

    return wait_for(found, timeout=30, message="the beat process among the worker's children")


class Chaos(threading.Thread):
    """SIGKILLs a random pool child every 2-4 s; restarts the broker once, mid-run."""

    def __init__(self, workers, spared: set[int], broker, restart_after: float):
        super().__init__(daemon=True)
        self.workers = workers
        self.spared = spared
        self.broker = broker
        self.restart_after = restart_after
        self.stopping = threading.Event()
        self.kills = 0
        self.broker_restarts = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random()
        started = time.monotonic()
        try:
            while not self.stopping.wait(rng.uniform(2, 4)):
                if not self.broker_restarts and time.monotonic() - started > self.restart_after:
                    # Down long enough that submissions meanwhile cannot publish.
                    self.broker.restart(down_for=3)
                    self.broker_restarts += 1
                victims = [pid for w in self.workers for pid in w.child_pids()
                           if pid not in self.spared]
                if not victims:
                    continue
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass  # it exited on its own between the listing and the kill
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        if self.error is not None:
            raise self.error


def stuck_report(engine, job_ids, workers, beat: int) -> str:
    """What a run that did not finish looks like: the live jobs, beat, the last sweeps."""
    with engine.connect() as conn:
        live = conn.execute(
            select(jobs.c.id, jobs.c.status, jobs.c.attempts, jobs.c.updated_at,
                   jobs.c.heartbeat_at, jobs.c.reserved_at, jobs.c.output_key.is_not(None),
                   jobs.c.stored_at, job_dispatches.c.sent_at, job_dispatches.c.attempts,
                   func.now())
            .join(job_dispatches, job_dispatches.c.job_id == jobs.c.id)
            .where(jobs.c.id.in_(job_ids), jobs.c.status.in_(("pending", "queued",
                                                              "processing")))
        ).all()
    sweeps = [line for w in workers for line in w.log().splitlines() if "sweep: {" in line]
    return "\n".join([
        f"{len(live)} live jobs; beat {beat} alive: {os.path.exists(f'/proc/{beat}')}",
        *(f"  {tuple(row)}" for row in live[:20]),
        "last sweeps:", *sweeps[-5:],
        "worker errors:", *error_lines(workers),
    ])


FAULT_JOBS = 300
SUBMIT_BATCH = 10
SUBMIT_PAUSE_S = 1.0
TERMINAL_WAIT_S = 150


def test_jobs_survive_killed_workers_and_a_restarted_broker(own_database, own_redis, slow_plugin,
                                                            tmp_path, start_worker):
    """Every job ends, and ends charged exactly once or refunded whole.

    Recovery is the sweeper's, by design. A killed child's message is requeued at once
    (task_reject_on_worker_lost), but its generate step then finds the job's claim still
    fresh and drops it as busy. Messages in a Redis that restarts are gone (it keeps
    nothing on disk), and Redis hands an unacknowledged message to another worker only
    after REDIS_VISIBILITY_TIMEOUT (3600 s), which must stay above the generate step's
    hard time limit or a slow healthy call would run twice. So beat's sweep re-drives
    jobs whose worker is gone (heartbeat older than STALE_AFTER_SECONDS), queued jobs
    whose message may be lost (REQUEUE_AFTER_SECONDS), and relays the ones
    whose submit could not publish; every step being idempotent makes that safe.
    """
    env = distributed_env(
        tmp_path, own_database, "", storage_url=f"file://{tmp_path}/storage",
        CELERY_BROKER_URL=own_redis.url, PYTHONPATH=worker_pythonpath(slow_plugin),
        STALE_AFTER_SECONDS=8, REQUEUE_AFTER_SECONDS=8, SWEEP_INTERVAL_SECONDS=1,
        DISPATCH_GRACE_SECONDS=1, MAX_ATTEMPTS=5, HOLD_TIMEOUT_SECONDS=3600,
        PUBLISH_TIMEOUT_SECONDS=1,
    )
    rt, _ = pipeline_runtime(env)
    assert "slow" in rt.registry.names()
    price_slow_provider(rt.engine)
    company = make_company(rt.engine, credits=100, name="chaos")
    with_beat = start_worker(env, queues=SLOW_QUEUES, pool="prefork", concurrency=2,
                             beat=True)
    plain = start_worker(env, queues=SLOW_QUEUES, pool="prefork", concurrency=2)
    workers = [with_beat, plain]
    beat = beat_pid(with_beat, concurrency=2)
    chaos = Chaos(workers, {beat}, own_redis, restart_after=12)

    def body(n: int) -> dict:
        # A few jobs are refused by the provider (failed and refunded, whatever the chaos)
        # and some meet transient errors (retried by the generate step).
        kind = "reject" if n % 20 == 0 else "flaky" if n % 10 == 5 else "steady"
        return {"contentType": "text", "prompt": f"job {n}: {kind}", "provider": "slow"}

    started = time.monotonic()
    chaos.start()
    job_ids: list[str] = []
    try:
        with api_server(rt) as url, ThreadPoolExecutor(SUBMIT_BATCH) as pool:
            for first in range(0, FAULT_JOBS, SUBMIT_BATCH):
                batch = list(pool.map(lambda n: submit(url, company.api_key, body(n)),
                                      range(first, first + SUBMIT_BATCH)))
                assert [r.status_code for r in batch] == [202] * SUBMIT_BATCH, \
                    [r.text for r in batch if r.status_code != 202]
                job_ids += [r.json()["jobId"] for r in batch]
                time.sleep(SUBMIT_PAUSE_S)
        time.sleep(5)  # a few more kills while the tail of the run is in flight
    finally:
        chaos.stop()
    submitted_s = time.monotonic() - started

    try:
        wait_terminal(rt.engine, job_ids, timeout=TERMINAL_WAIT_S)
    except AssertionError:
        pytest.fail(f"not every job ended within {TERMINAL_WAIT_S}s\n"
                    + stuck_report(rt.engine, job_ids, workers, beat))
    elapsed = time.monotonic() - started

    rows = jobs_by_id(rt.engine, job_ids)
    outcomes = assert_charged_once(rt.engine, job_ids)
    completed = sum(n for (status, _), n in outcomes.items() if status == "completed")
    failed = len(job_ids) - completed
    with rt.engine.connect() as conn:
        refunds = conn.execute(
            select(func.count()).select_from(transactions)
            .where(transactions.c.type == "refund", transactions.c.job_id.in_(job_ids))
        ).scalar_one()
        relays = conn.execute(
            select(func.count()).select_from(job_dispatches)
            .where(job_dispatches.c.job_id.in_(job_ids), job_dispatches.c.attempts > 1)
        ).scalar_one()
        open_holds = conn.execute(
            select(func.count()).select_from(credit_holds)
            .where(credit_holds.c.status == "open")
        ).scalar_one()
        # One row per provider call; a call cut short by a kill or a lost broker never
        # records how it ended (outcome NULL) and is made again after a re-drive.
        attempt_outcomes = Counter(dict(conn.execute(
            select(job_attempts.c.outcome, func.count())
            .where(job_attempts.c.job_id.in_(job_ids))
            .group_by(job_attempts.c.outcome)
        ).all()))
    redeliveries = sum(max(job.attempts - 1, 0) for job in rows.values())
    failures = {code: n for (status, code), n in outcomes.items() if status != "completed"}
    print(f"\nfault run: jobs={len(job_ids)} completed={completed} failed={failed} {failures}"
          f" kills={chaos.kills} broker_restarts={chaos.broker_restarts} "
          f"redeliveries(sum attempts-1)={redeliveries} "
          f"provider_calls={dict(attempt_outcomes)} "
          f"generate_deliveries={log_count(workers, 'pipeline.generate[', 'received')} "
          f"worker_lost={log_count(workers, 'WorkerLostError')} "
          f"outbox_relayed={relays} refunds={refunds} "
          f"submitted_in={submitted_s:.0f}s all_terminal_in={elapsed:.0f}s")
    for job in rows.values():
        if job.status != "completed" and "reject" not in job.prompt:
            print(f"  failed: {job.id} {job.error_code} attempts={job.attempts}: {job.error}")
    for line in error_lines(workers, limit=10, ignore=CHAOS_NOISE):
        print("  worker error:", line[:300])

    assert os.path.exists(f"/proc/{beat}"), "beat died: nothing swept after that"
    assert chaos.kills >= 5
    assert chaos.broker_restarts == 1
    assert relays >= 1, "no submission met the broker down: the outbox relay went untested"
    assert set(job_statuses(rt.engine, job_ids).values()) <= {"completed", "failed"}
    assert open_holds == 0
    assert not duplicate_idempotency_keys(rt.engine)
    wallet = wallet_of(rt.engine, company.company_id)
    assert wallet.credits_held == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    assert run_audit(rt.engine) == []
    refused = {job_id for job_id, job in rows.items() if "reject" in job.prompt}
    assert {(rows[j].status, rows[j].error_code) for j in refused} == {
        ("failed", "PROVIDER_REJECTED")}
    assert completed >= 0.9 * len(job_ids), outcomes
    rt.engine.dispose()


# --- 3. the same chain delivered twice -----------------------------------------------------


DUPLICATED_JOBS = 6


def queues_drained(broker_url: str, prefix: str, queues) -> bool:
    """No message waits in a queue or sits unacknowledged with a worker."""
    client = redis.Redis.from_url(broker_url)
    waiting = sum(client.llen(f"{prefix}{q}") for q in queues)
    return waiting == 0 and client.hlen(f"{prefix}unacked") == 0


def output_saved(engine, job_id) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(jobs.c.output_key).where(jobs.c.id == job_id)).scalar_one() \
            is not None


def test_a_chain_delivered_twice_charges_once(own_database, own_redis_prefix, slow_plugin,
                                              tmp_path, start_worker):
    """Copies of a job's chain arrive at each stage of its life; it is charged once.

    The API publishes the chain once. A second copy races it from the start (its generate
    usually finds the job claimed by the first); a third is published once the output is
    saved (it finds the job finishing or finished); a fourth after the job is settled.
    """
    env = distributed_env(tmp_path, own_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/storage",
                          PYTHONPATH=worker_pythonpath(slow_plugin))
    rt, celery_app = pipeline_runtime(env)
    price_slow_provider(rt.engine)
    company = make_company(rt.engine, credits=5, name="twice")
    workers = [start_worker(env, queues=SLOW_QUEUES, concurrency=4) for _ in range(2)]
    body = {"contentType": "text", "prompt": "say it twice", "provider": "slow"}

    def publish_again(job_id):
        build_chain(celery_app, job_id, SLOW_QUEUE).apply_async()

    with api_server(rt) as url:
        job_ids = []
        for _ in range(DUPLICATED_JOBS):
            resp = submit(url, company.api_key, body)
            assert resp.status_code == 202, resp.text
            job_ids.append(resp.json()["jobId"])
            publish_again(job_ids[-1])
    for job_id in job_ids:
        wait_for(lambda job_id=job_id: output_saved(rt.engine, job_id), timeout=60,
                 interval=0.02, message=f"job {job_id}'s output")
        publish_again(job_id)
    assert set(wait_terminal(rt.engine, job_ids, timeout=90).values()) == {"completed"}
    for job_id in job_ids:
        publish_again(job_id)

    # The API's chain starts at generate (the submit took the hold); the three copies
    # published here are whole chains, reserve first.
    copies = 4
    wait_for(lambda: log_count(workers, "pipeline.reserve[", "received")
             >= (copies - 1) * DUPLICATED_JOBS, timeout=30,
             message="every whole copy's reserve step")
    wait_for(lambda: queues_drained(REDIS_URL, own_redis_prefix, SLOW_QUEUES),
             timeout=60, interval=0.5, message="the duplicate chains to drain")
    print(f"\nduplicates: {DUPLICATED_JOBS} jobs x {copies} copies; received: "
          + ", ".join(f"{step} {log_count(workers, f'pipeline.{step}[', 'received')}"
                      for step in ("reserve", "generate", "finish")))
    assert log_count(workers, "pipeline.generate[", "received") >= 2 * DUPLICATED_JOBS

    assert set(job_statuses(rt.engine, job_ids).values()) == {"completed"}
    outcomes = assert_charged_once(rt.engine, job_ids)
    assert outcomes == {("completed", None): DUPLICATED_JOBS}
    assert not duplicate_idempotency_keys(rt.engine)
    spent = sum((j.actual_cost for j in jobs_by_id(rt.engine, job_ids).values()), Decimal(0))
    wallet = wallet_of(rt.engine, company.company_id)
    assert wallet.credits_used == spent
    assert wallet.credits_available == Decimal(5) - spent
    assert wallet.credits_held == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    assert run_audit(rt.engine) == []
    rt.engine.dispose()
