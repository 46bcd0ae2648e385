"""Builders with sensible defaults, and waiting helpers, shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from decimal import Decimal

from sqlalchemy import func, select
from werkzeug.serving import make_server

from pipeline.accounts import NewCompany, create_company
from pipeline.tables import TERMINAL_STATUSES, jobs, transactions, wallets


def make_company(engine, credits=100, name: str = "acme") -> NewCompany:
    return create_company(engine, name, credits=Decimal(str(credits)))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


def job_statuses(engine, job_ids) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(job_ids)))
        return {str(r.id): r.status for r in rows}


def wait_terminal(engine, job_ids, timeout: float = 90) -> dict[str, str]:
    def done():
        statuses = job_statuses(engine, job_ids)
        if len(statuses) == len(job_ids) and all(s in TERMINAL_STATUSES
                                                   for s in statuses.values()):
            return statuses
        return None

    return wait_for(done, timeout, message=f"{len(job_ids)} jobs to finish")


def count_jobs(engine, company_id) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(jobs)
                            .where(jobs.c.company_id == company_id)).scalar_one()


def wallet_of(engine, company_id):
    with engine.connect() as conn:
        return conn.execute(select(wallets).where(wallets.c.company_id == company_id)).one()


def ledger_sums(engine, wallet_id) -> dict[str, Decimal]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(transactions.c.type, transactions.c.amount, transactions.c.metadata)
            .where(transactions.c.wallet_id == wallet_id)
        ).all()
    sums = {t: Decimal(0) for t in ("deposit", "reservation", "debit", "release", "refund",
                                   "late_debit", "operator_refund")}
    for row in rows:
        kind = row.type
        if row.type == "debit" and row.metadata.get("late"):
            kind = "late_debit"
        elif row.type == "refund" and row.metadata.get("kind") == "operator":
            kind = "operator_refund"
        sums[kind] += row.amount
    return sums


def assert_wallet_matches_ledger(engine, company_id) -> None:
    """Invariant 2: the wallet's balances are the sum of its transactions."""
    wallet = wallet_of(engine, company_id)
    s = ledger_sums(engine, wallet.id)
    available = (s["deposit"] - s["reservation"] + s["release"] + s["refund"] - s["late_debit"]
                 + s["operator_refund"])
    held = s["reservation"] - s["debit"] - s["release"] - s["refund"]
    assert wallet.credits_available == available
    assert wallet.credits_held == held
    assert wallet.credits_used == s["debit"] + s["late_debit"] - s["operator_refund"]
    assert wallet.credits_available >= 0


def stop_process_group(proc, timeout: float = 20) -> None:
    """SIGTERM a subprocess started in its own session, SIGKILL it past `timeout`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def job_row(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(select(jobs).where(jobs.c.id == job_id)).one()


def ledger_entries(engine, job_id) -> list[str]:
    """The types of the job's ledger entries, sorted."""
    with engine.connect() as conn:
        return sorted(r.type for r in conn.execute(
            select(transactions.c.type).where(transactions.c.job_id == job_id)))


@contextlib.contextmanager
def serving(app, port: int = 0):
    """The app on a real threaded HTTP server (werkzeug's, as service/stack.py runs it),
    on `port` (0: a free one); yields its URL. Stopped at the end, and with it the app's
    event hub, so no listener thread outlives the test."""
    from api.events import HUB

    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        app.extensions[HUB].close()
