"""The hot wallet: reservations per second on ONE wallet from 8 threads, the reserve use
case (pipeline.lifecycle.reserve: the one statement the API runs after a submit, or the
chain's reserve step) against the raw conditional UPDATE it is built on."""

from __future__ import annotations

import queue
import threading
import time
from decimal import Decimal

import psycopg
from sqlalchemy import select

from bench import stack
from bench.context import Context
from bench.report import figure
from bench.rows import copy_jobs, template_job
from pipeline import lifecycle
from pipeline.db import make_engine
from pipeline.tables import jobs
from tests.builders import assert_wallet_matches_ledger, make_company

THREADS = 8


def _in_threads(work, items: list) -> float:
    """Run work(item) for every item from THREADS threads; items per second."""
    todo: queue.Queue = queue.Queue()
    for item in items:
        todo.put(item)
    errors: list[BaseException] = []

    def drain():
        try:
            while True:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                work(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain) for _ in range(THREADS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(items) / (time.monotonic() - start)


def raw_updates(pg_url: str, wallet_id, amount: Decimal, count: int) -> float:
    """The conditional UPDATE alone, one transaction each, on a connection per thread."""
    local = threading.local()

    def one(_):
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = psycopg.connect(pg_url, autocommit=True)
        cur = conn.execute(
            "UPDATE wallets SET credits_available = credits_available - %s, "
            "credits_held = credits_held + %s, updated_at = now() "
            "WHERE id = %s AND credits_available >= %s", (amount, amount, wallet_id, amount))
        if cur.rowcount != 1:
            raise RuntimeError("the raw UPDATE found the wallet short")

    return _in_threads(one, list(range(count)))


def measure(ctx: Context) -> dict:
    count = 300 if ctx.quick else 1000
    ctx.log(f"hot wallet: {ctx.repetitions} x {count} reservations from {THREADS} threads")
    folder = ctx.folder("wallet")
    with stack.scratch_database("bench") as pg, stack.scratch_prefix() as prefix:
        runtime = stack.runtime_for(stack.bench_env(folder, pg, prefix))
        engine = make_engine(pg, pool_size=THREADS)
        try:
            company = make_company(engine, credits=10**9)
            template = template_job(runtime, company)
            with engine.connect() as conn:
                amount = conn.execute(select(jobs.c.estimated_cost)
                                      .where(jobs.c.id == template)).scalar_one()
            ttl = runtime.settings.hold_timeout_seconds
            ours, raw = [], []
            for rep in range(ctx.repetitions + 1):  # the first is a warm-up
                raw_rate = raw_updates(pg, company.wallet_id, amount, count)
                ids = _new_pending(engine, template, company, count)
                our_rate = _in_threads(
                    lambda job_id: lifecycle.reserve(engine, job_id, ttl_seconds=ttl), ids)
                if rep:
                    raw.append(raw_rate)
                    ours.append(our_rate)
                    ctx.log(f"  rep {rep}: raw UPDATE {raw_rate:.0f}/s, reserve "
                            f"{our_rate:.0f}/s")
            _give_back_raw(engine, company.wallet_id, amount, count * (ctx.repetitions + 1))
            assert_wallet_matches_ledger(engine, company.company_id)
        finally:
            engine.dispose()
            runtime.engine.dispose()
    return {"hot_wallet": figure(
        "reservations/s", ours, raw, reference_name="raw conditional UPDATE",
        target="ratio >= 0.5", met=lambda f: f["ratio"]["median"] >= 0.5,
        extra={"settings": {"threads": THREADS, "wallets": 1, "per_repetition": count,
                            "use_case": "pipeline.lifecycle.reserve (job mark, hold row, "
                                        "ledger entry, wallet UPDATE: one statement), as "
                                        "the API runs it after a submit"}})}


def _new_pending(engine, template, company, count: int) -> list:
    with engine.begin() as conn:
        before = set(conn.scalars(select(jobs.c.id).where(
            jobs.c.company_id == company.company_id)))
    copy_jobs(engine, template, count)
    with engine.connect() as conn:
        return [i for i in conn.scalars(select(jobs.c.id).where(
            jobs.c.company_id == company.company_id)) if i not in before]


def _give_back_raw(engine, wallet_id, amount, count: int) -> None:
    """Undo the raw UPDATEs (they wrote no ledger entries), so the audit below holds."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE wallets SET credits_available = credits_available + %(t)s, "
            "credits_held = credits_held - %(t)s WHERE id = %(w)s",
            {"t": amount * count, "w": wallet_id})
