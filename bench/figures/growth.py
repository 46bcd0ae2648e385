"""Growth: the reads that run per request or per sweep, timed at 10k and at 1M job rows
(100k in --quick), with the plans of the statements they run."""

from __future__ import annotations

import statistics
import time

from sqlalchemy import func, select

from bench import stack
from bench.context import Context
from bench.report import figure
from bench.rows import Statements, copy_jobs, seq_scans_on, template_job
from pipeline import listing, sweeper
from pipeline.jobs import get_job
from pipeline.tables import jobs
from tests.builders import make_company

CALLS = 15


def _operations(runtime, company):
    """name -> a call; each reads what its endpoint or task reads."""
    from api.metrics import DatabaseCollector

    engine = runtime.engine
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(jobs)).scalar_one()
        deep = conn.execute(select(jobs.c.id, jobs.c.created_at)
                            .where(jobs.c.company_id == company.company_id)
                            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                            .offset(total // 2).limit(1)).one()
        some = conn.execute(select(jobs.c.id).where(jobs.c.company_id == company.company_id)
                            .offset(total // 3).limit(1)).scalar_one()
    cursor = listing.Cursor(deep.created_at, deep.id)
    collector = DatabaseCollector(runtime)

    def lookup():
        with engine.connect() as conn:
            get_job(conn, some, company.company_id)

    def list_page(**kw):
        def call():
            with engine.connect() as conn:
                listing.list_jobs(conn, company.company_id, limit=20, **kw)
        return call

    return {
        "job_lookup": lookup,
        "list_first_page": list_page(),
        "list_deep_page": list_page(after=cursor),
        "list_by_status": list_page(filters=listing.JobFilter(statuses=("failed",))),
        "metrics_collector": lambda: list(collector._read()),
        "sweeper_pass": lambda: sweeper.sweep(runtime),
    }


def _time(call) -> float:
    """Median ms of CALLS calls, after one untimed."""
    call()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _at_size(runtime, company, ctx, size: int) -> tuple[dict, dict]:
    ops = _operations(runtime, company)
    times = {name: [] for name in ops}
    for _ in range(ctx.repetitions):
        for name, call in ops.items():
            times[name].append(_time(call))
    plans = {}
    for name, call in ops.items():
        with Statements(runtime.engine) as seen:
            call()
        plans[name] = seen.plans()
    ctx.log(f"  {size} rows: " + ", ".join(
        f"{n} {statistics.median(t):.2f} ms" for n, t in times.items()))
    return times, plans


def measure(ctx: Context) -> dict:
    small, large = 10_000, (100_000 if ctx.quick else 1_000_000)
    ctx.log(f"growth: {small} then {large} job rows")
    folder = ctx.folder("growth")
    with stack.scratch_database("bench") as pg, stack.scratch_prefix() as prefix:
        runtime = stack.runtime_for(stack.bench_env(folder, pg, prefix))
        try:
            company = make_company(runtime.engine, credits=10**9)
            template = template_job(runtime, company)
            copy_jobs(runtime.engine, template, small - 1, status="completed", finished=True,
                      spread_seconds=30 * 86400)
            small_times, _ = _at_size(runtime, company, ctx, small)
            start = time.monotonic()
            copy_jobs(runtime.engine, template, large - small, status="completed",
                      finished=True, spread_seconds=365 * 86400)
            ctx.log(f"  loaded {large - small} rows in {time.monotonic() - start:.0f} s")
            large_times, large_plans = _at_size(runtime, company, ctx, large)
        finally:
            runtime.engine.dispose()
    out = {}
    for name in small_times:
        out[f"growth_{name}"] = figure(
            "ms", large_times[name], small_times[name],
            reference_name=f"same at {small} rows", better="lower",
            target=f"ratio <= 2 ({large} / {small} rows)",
            met=lambda f: f["ratio"]["median"] <= 2,
            extra={"rows": {"small": small, "large": large},
                   "plans_at_large": large_plans[name],
                   "seq_scans_on_jobs_at_large": seq_scans_on(large_plans[name], "jobs")})
    return out
