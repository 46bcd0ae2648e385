"""Database round trips per job, by step: every statement, every BEGIN, COMMIT and
ROLLBACK the driver sends, and every pool pre-ping, counted in-process while one text
job on the local provider goes through the API (Flask's test client, the submit taking
the hold), generate, and finish (store, then settle), then is read back. Broker and
Redis calls are not counted."""

from __future__ import annotations

from collections import Counter

import psycopg.pq
from sqlalchemy import event

from bench import stack
from bench.context import Context
from bench.report import figure
from tests.builders import auth, make_company

IDLE = psycopg.pq.TransactionStatus.IDLE


class RoundTrips:
    """Counts what an engine sends to the server, under the phase named last."""

    def __init__(self, engine):
        self.engine = engine
        self.phase = "setup"
        self.counts: Counter = Counter()
        self.checkouts: Counter = Counter()
        pre_ping = getattr(engine.pool, "_pre_ping", False)

        @event.listens_for(engine, "before_cursor_execute")
        def _statement(conn, cursor, statement, parameters, context, executemany):  # noqa: PLR0917 (the event's signature)
            raw = conn.connection.dbapi_connection
            if not raw.autocommit and raw.info.transaction_status == IDLE:
                self.counts[self.phase] += 1  # psycopg sends BEGIN first
            self.counts[self.phase] += 1

        def _ends(conn):
            raw = conn.connection.dbapi_connection
            if raw is not None and raw.info.transaction_status != IDLE:
                self.counts[self.phase] += 1

        event.listen(engine, "commit", _ends)
        event.listen(engine, "rollback", _ends)

        @event.listens_for(engine.pool, "checkout")
        def _checkout(dbapi_conn, record, proxy):
            self.checkouts[self.phase] += 1
            if pre_ping:
                self.counts[self.phase] += 1

        @event.listens_for(engine.pool, "reset")
        def _reset(dbapi_conn, record, reset_state):
            if not dbapi_conn.autocommit and dbapi_conn.info.transaction_status != IDLE:
                self.counts[self.phase] += 1  # the pool's rollback on return


def count_one_job(runtime, client, company) -> tuple[Counter, Counter]:
    from pipeline import generation, lifecycle

    counter = RoundTrips(runtime.engine)
    counter.phase = "api_submit"
    answer = client.post("/v1/jobs", headers=auth(company.api_key),
                         json={"contentType": "text", "provider": "local",
                               "prompt": "count the round trips"})
    assert answer.status_code == 202, answer.get_json()
    job_id = answer.get_json()["jobId"]
    engine = runtime.engine
    # No reserve step: the submit took the hold (the job's chain starts at generate).
    counter.phase = "generate"
    generation.generate(runtime, job_id)
    counter.phase = "finish"  # store, then settle: the finish task's use case
    assert lifecycle.finish(engine, runtime.storage, job_id)
    counter.phase = "api_get"
    answer = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key))
    assert answer.get_json()["status"] == "completed", answer.get_json()
    counter.phase = "done"
    return counter.counts, counter.checkouts


def measure(ctx: Context) -> dict:
    from api import create_app

    ctx.log("round trips per job (in-process, counted)")
    folder = ctx.folder("roundtrips")
    with stack.scratch_database("bench") as pg, stack.scratch_prefix() as prefix:
        runtime = stack.runtime_for(stack.bench_env(folder, pg, prefix))
        try:
            company = make_company(runtime.engine, credits=10**6)
            client = create_app(runtime).test_client()
            count_one_job(runtime, client, company)  # warm-up: caches, first connections
            counts, checkouts = count_one_job(runtime, client, company)
        finally:
            runtime.engine.dispose()
    phases = ["api_submit", "generate", "finish", "api_get"]
    total = sum(counts[p] for p in phases)
    ctx.log("  " + ", ".join(f"{p} {counts[p]}" for p in phases) + f"; total {total}")
    return {"round_trips_per_job": figure(
        "round trips", [total], None, reference_name="-", better="lower", target="",
        met=None, extra={"by_step": {p: counts[p] for p in phases},
                         "checkouts_by_step": {p: checkouts[p] for p in phases},
                         "note": "database only (statements, BEGIN/COMMIT/ROLLBACK, "
                                 "pre-pings); broker and Redis calls not counted"})}
