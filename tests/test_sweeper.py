"""The sweeper on PostgreSQL: each sweep fixes its case once; two sweepers never share a job."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError

from pipeline import jobs as jobs_uc
from pipeline import lifecycle, sweeper
from pipeline.audit import audit
from pipeline.config import Settings
from pipeline.db import init_db, utcnow
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.tables import credit_holds, job_dispatches, jobs, transactions
from service.runtime import build_runtime
from tests.builders import assert_wallet_matches_ledger, make_company, wallet_of

pytestmark = pytest.mark.postgres

GRACE, STALE, REQUEUE = 5, 60, 600
SECRETS = "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ="


class RecordingPublisher:
    """Counts what would reach the broker; `during(job_id)` runs inside each publish."""

    def __init__(self, *, delay: float = 0.0, fail: bool = False, during=None):
        self.sent: list = []
        self.delay, self.fail, self.during = delay, fail, during
        self._lock = threading.Lock()

    def publish(self, job_id, queue: str, *, reserved: bool = False) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        if self.during is not None:
            self.during(job_id)
        if self.delay:
            time.sleep(random.uniform(0, self.delay))  # a broker round trip, give or take
        with self._lock:
            self.sent.append(job_id)

    def per_job(self) -> Counter:
        with self._lock:
            return Counter(self.sent)


def runtime(database_url: str, tmp_path, publisher=None):
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"), "DATABASE_URL": database_url,
        "SECRET_KEY": "k", "PROVIDER_KEY_SECRETS": SECRETS,
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
        "DISPATCH_GRACE_SECONDS": str(GRACE), "STALE_AFTER_SECONDS": str(STALE),
        "REQUEUE_AFTER_SECONDS": str(REQUEUE)})
    rt = build_runtime(settings, publisher=publisher or RecordingPublisher())
    init_db(rt.engine)
    return rt


@pytest.fixture
def rt(empty_pg_database, tmp_path):
    """A runtime on a database of this test's own: a sweep sees every row in it."""
    runtime_ = runtime(empty_pg_database, tmp_path)
    yield runtime_
    runtime_.engine.dispose()


# --- jobs in each state a sweep is for ----------------------------------------------------


def _submit(rt, company):
    return submit_job(rt.engine, rt.registry,
                      principal=Principal(company.company_id, company.user_id, None),
                      req=JobRequest("text", "a short poem", {}), max_prompt_length=4000)["id"]


def _age(rt, job_ids, seconds: float, *columns: str) -> None:
    """Move the given timestamps of the jobs `seconds` into the past."""
    past = utcnow() - timedelta(seconds=seconds)
    with rt.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id.in_(job_ids))
                     .values(**dict.fromkeys(columns, past)))


def unsent(rt, company, n=1):
    """Committed, but the publish at submit never reached the broker."""
    ids = [_submit(rt, company) for _ in range(n)]
    _age(rt, ids, GRACE + 5, "updated_at")
    with rt.engine.begin() as conn:  # the outbox row was written with the job
        conn.execute(update(job_dispatches).where(job_dispatches.c.job_id.in_(ids))
                     .values(created_at=utcnow() - timedelta(seconds=GRACE + 5)))
    return ids


def _queued(rt, company, n):
    ids = [_submit(rt, company) for _ in range(n)]
    with rt.engine.begin() as conn:
        for job_id in ids:
            jobs_uc.mark_dispatched(conn, job_id)
    return ids


def lost_message(rt, company, n=1):
    """Queued and never consumed for longer than REQUEUE_AFTER_SECONDS."""
    ids = _queued(rt, company, n)
    _age(rt, ids, REQUEUE + 60, "updated_at")
    return ids


def _processing(rt, company, n):
    ids = _queued(rt, company, n)
    for job_id in ids:
        lifecycle.reserve(rt.engine, job_id, ttl_seconds=3600)
        assert lifecycle.claim_generation(rt.engine, job_id, stale_after=STALE) is not None
    return ids


def dead_worker(rt, company, n=1):
    """Processing, and its worker stopped renewing the heartbeat a while ago."""
    ids = _processing(rt, company, n)
    _age(rt, ids, STALE * 2, "updated_at", "heartbeat_at")
    return ids


def expired_hold(rt, company, n=1):
    """A live job whose credit hold is past its timeout."""
    ids = _queued(rt, company, n)
    for job_id in ids:
        lifecycle.reserve(rt.engine, job_id, ttl_seconds=-1)
    return ids


def terminal_with_open_hold(rt, company, n=1, status="failed", actual_cost=None):
    """Terminal, its hold still open: a crash between two writes, or an operator's edit."""
    ids = _queued(rt, company, n)
    for job_id in ids:
        lifecycle.reserve(rt.engine, job_id, ttl_seconds=3600)
    with rt.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id.in_(ids))
                     .values(status=status, actual_cost=actual_cost, updated_at=utcnow()))
    return ids


def status_of(rt, job_id):
    with rt.engine.connect() as conn:
        return get_job(conn, job_id)


def entries(rt, job_ids) -> Counter:
    """(job, type) -> how many ledger entries."""
    with rt.engine.connect() as conn:
        rows = conn.execute(select(transactions.c.job_id, transactions.c.type)
                            .where(transactions.c.job_id.in_(job_ids)))
        return Counter((row.job_id, row.type) for row in rows)


def sweep_once(rt):
    return sweeper.sweep(rt, batch=100)


# --- each sweep fixes its case --------------------------------------------------------------


def test_an_unsent_job_is_relayed_once_after_the_grace_period(rt):
    company = make_company(rt.engine)
    [late] = unsent(rt, company)
    fresh = _submit(rt, company)  # its own publish may still be under way

    assert sweep_once(rt)["dispatched"] == 1
    assert rt.publisher.per_job() == {late: 1}
    job = status_of(rt, late)
    assert job.status == "queued"
    with rt.engine.connect() as conn:
        sent = conn.execute(select(job_dispatches.c.job_id)
                            .where(job_dispatches.c.sent_at.is_not(None))).scalars().all()
    assert sent == [late]
    assert sweep_once(rt)["dispatched"] == 0
    assert rt.publisher.per_job() == {late: 1}
    assert status_of(rt, fresh).status == "pending"


def test_a_broker_failure_ends_the_relay_and_the_job_is_tried_again_a_grace_period_later(rt):
    company = make_company(rt.engine)
    ids = unsent(rt, company, 3)
    rt.publisher = RecordingPublisher(fail=True)
    assert sweeper.relay_outbox(rt.engine, rt.publisher, grace_seconds=GRACE) == 0
    with rt.engine.connect() as conn:
        outbox = conn.execute(select(job_dispatches.c.attempts, job_dispatches.c.last_error)
                              .where(job_dispatches.c.job_id.in_(ids))).all()
    # The first publish failed and ended the batch; all three stay unsent.
    assert sorted(tuple(row) for row in outbox) == [(0, None), (0, None),
                                                    (1, "ConnectionError")]

    rt.publisher = RecordingPublisher()
    assert sweeper.relay_outbox(rt.engine, rt.publisher, grace_seconds=GRACE) == 0  # paced
    _age(rt, ids, GRACE + 1, "updated_at")
    assert sweeper.relay_outbox(rt.engine, rt.publisher, grace_seconds=GRACE) == 3
    assert rt.publisher.per_job() == dict.fromkeys(ids, 1)


def test_a_queued_job_whose_message_was_lost_is_published_again_after_the_requeue_window(rt):
    company = make_company(rt.engine)
    [lost] = lost_message(rt, company)
    waiting = _queued(rt, company, 1)[0]
    _age(rt, [waiting], REQUEUE - 60, "updated_at")  # may still sit in a backlog

    assert sweep_once(rt)["redriven"] == 1
    assert rt.publisher.per_job() == {lost: 1}
    assert sweep_once(rt)["redriven"] == 0  # the re-drive waits a whole window again
    # The re-published chain takes the job as any first delivery would.
    assert lifecycle.claim_generation(rt.engine, lost, stale_after=STALE) is not None


def test_a_job_whose_worker_died_is_redriven_and_a_live_one_is_left_alone(rt):
    company = make_company(rt.engine)
    [dead] = dead_worker(rt, company)
    [live] = _processing(rt, company, 1)
    _age(rt, [live], STALE * 2, "updated_at")  # quiet for long, but its heartbeat is fresh
    [released, lost_retry] = _processing(rt, company, 2)
    lifecycle.release_claim(rt.engine, released, wake_in=3 * STALE)  # a long Retry-After
    lifecycle.release_claim(rt.engine, lost_retry, wake_in=0)
    _age(rt, [released, lost_retry], STALE * 2, "updated_at")
    _age(rt, [lost_retry], STALE * 2, "wake_at")

    assert sweep_once(rt)["redriven"] == 2
    assert rt.publisher.per_job() == {dead: 1, lost_retry: 1}
    assert sweep_once(rt)["redriven"] == 0
    # The dead worker's claim is stale, so the re-driven delivery takes the job over.
    claim = lifecycle.claim_generation(rt.engine, dead, stale_after=STALE)
    assert claim is not None
    assert claim.job.status == "processing"
    assert lifecycle.claim_generation(rt.engine, live, stale_after=STALE) is None


def test_an_expired_hold_fails_its_job_and_is_refunded_once(rt):
    company = make_company(rt.engine, credits=1)
    [job_id] = expired_hold(rt, company)
    assert wallet_of(rt.engine, company.company_id).credits_held > 0

    assert sweep_once(rt)["expired"] == 1
    job = status_of(rt, job_id)
    assert (job.status, job.error_code) == ("failed", "HOLD_EXPIRED")
    assert entries(rt, [job_id]) == {(job_id, "reservation"): 1, (job_id, "refund"): 1}
    wallet = wallet_of(rt.engine, company.company_id)
    assert (wallet.credits_available, wallet.credits_held) == (1, 0)
    assert sweep_once(rt)["expired"] == 0
    assert audit(rt.engine) == []


def test_a_terminal_job_with_an_open_hold_is_refunded_or_settled(rt):
    company = make_company(rt.engine, credits=1)
    [failed] = terminal_with_open_hold(rt, company)
    [completed] = terminal_with_open_hold(rt, company, status="completed",
                                          actual_cost=Decimal("0.000001"))

    assert sweep_once(rt)["holds_closed"] == 2
    with rt.engine.connect() as conn:
        holds = dict(conn.execute(select(credit_holds.c.job_id, credit_holds.c.status)).all())
    assert holds == {failed: "voided", completed: "settled"}
    found = entries(rt, [failed, completed])
    assert found[(failed, "refund")] == 1
    assert found[(completed, "debit")] == 1
    assert found[(completed, "release")] == 1
    assert sweep_once(rt)["holds_closed"] == 0
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    assert wallet_of(rt.engine, company.company_id).credits_used == Decimal("0.000001")
    assert audit(rt.engine) == []


def test_no_row_lock_and_no_transaction_is_held_while_publishing(rt):
    """Inside each publish, another connection can lock the job and its outbox row at
    once (NOWAIT), and no session of the sweeper sits idle in a transaction."""
    company = make_company(rt.engine)
    ids = unsent(rt, company, 3) + lost_message(rt, company, 3) + dead_worker(rt, company, 3)
    seen: list[str] = []

    def during(job_id):
        with rt.engine.connect() as conn, conn.begin():
            try:
                for table in (jobs, job_dispatches):
                    key = table.c.id if table is jobs else table.c.job_id
                    conn.execute(select(key).where(key == job_id).with_for_update(nowait=True))
            except OperationalError as exc:  # LockNotAvailable
                seen.append(f"{job_id} locked: {exc.orig}")
                return
            idle = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'")).scalar_one()
            seen.append(idle)

    rt.publisher = RecordingPublisher(during=during)
    counts = sweep_once(rt)
    assert (counts["dispatched"], counts["redriven"]) == (3, 6)
    assert rt.publisher.per_job() == dict.fromkeys(ids, 1)
    assert seen == [0] * 9


# --- two sweepers at once ------------------------------------------------------------------

RACE_JOBS = 25  # of each kind
RACE_ROUNDS = 12


def test_two_sweepers_at_once_never_act_on_the_same_job_twice(rt, empty_pg_database,
                                                             tmp_path):
    """Two beats, each with its own engine (its own connections), sweep the same rows in
    small batches, over and over, with a publish that takes a few milliseconds."""
    company = make_company(rt.engine, credits=100)
    cases = {
        "dispatched": unsent(rt, company, RACE_JOBS),
        "lost": lost_message(rt, company, RACE_JOBS),
        "dead": dead_worker(rt, company, RACE_JOBS),
        "expired": expired_hold(rt, company, RACE_JOBS),
        "holds_closed": terminal_with_open_hold(rt, company, RACE_JOBS),
    }
    publisher = RecordingPublisher(delay=0.003)
    beats = [runtime(empty_pg_database, tmp_path / f"beat-{n}", publisher) for n in (1, 2)]
    start = threading.Barrier(len(beats))
    totals: list[Counter] = [Counter() for _ in beats]
    errors: list[BaseException] = []

    def beat(n: int) -> None:
        try:
            start.wait()
            for _ in range(RACE_ROUNDS):
                totals[n].update(sweeper.sweep(beats[n], batch=4))
        except BaseException as exc:  # reported below, with the thread's name
            errors.append(exc)

    threads = [threading.Thread(target=beat, args=(n,), name=f"beat-{n}")
               for n in range(len(beats))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for b in beats:
        b.engine.dispose()
    assert not errors, errors

    # Every job was acted on, by one sweeper, once.
    published = publisher.per_job()
    redriven = cases["lost"] + cases["dead"]
    assert published == dict.fromkeys(cases["dispatched"] + redriven, 1)
    both = totals[0] + totals[1]
    assert both["dispatched"] == RACE_JOBS
    assert both["redriven"] == 2 * RACE_JOBS
    assert both["expired"] == RACE_JOBS
    assert both["holds_closed"] == RACE_JOBS

    ledger = entries(rt, cases["expired"] + cases["holds_closed"])
    assert set(ledger.values()) == {1}
    refunded = {job for (job, kind) in ledger if kind == "refund"}
    assert refunded == set(cases["expired"] + cases["holds_closed"])
    with rt.engine.connect() as conn:
        open_holds = conn.execute(select(func.count()).select_from(credit_holds)
                                  .where(credit_holds.c.status == "open")).scalar_one()
        failed = conn.execute(select(func.count()).select_from(jobs).where(
            jobs.c.id.in_(cases["expired"]), jobs.c.error_code == "HOLD_EXPIRED")).scalar_one()
    assert (open_holds, failed) == (RACE_JOBS, RACE_JOBS)  # only the dead workers' holds
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    assert audit(rt.engine) == []


# --- the embedded default ------------------------------------------------------------------


def test_every_sweep_works_on_sqlite(tmp_path):
    sqlite = runtime(f"sqlite:///{tmp_path / 'pipeline.db'}", tmp_path)
    company = make_company(sqlite.engine, credits=1)
    relayed = unsent(sqlite, company)
    redriven = lost_message(sqlite, company) + dead_worker(sqlite, company)
    [expired] = expired_hold(sqlite, company)
    [closed] = terminal_with_open_hold(sqlite, company)

    counts = sweep_once(sqlite)
    assert (counts["dispatched"], counts["redriven"], counts["expired"],
            counts["holds_closed"]) == (1, 2, 1, 1)
    assert sqlite.publisher.per_job() == dict.fromkeys(relayed + redriven, 1)
    assert status_of(sqlite, expired).error_code == "HOLD_EXPIRED"
    assert entries(sqlite, [closed])[(closed, "refund")] == 1
    assert sweep_once(sqlite) == dict.fromkeys(counts, 0)
    assert_wallet_matches_ledger(sqlite.engine, company.company_id)
    sqlite.engine.dispose()
