"""Jobs per second end to end (HTTP submit to completed, the local provider answering at
once) against a bare 4-task Celery chain on the same broker, pool and concurrency; and
one job's submit-to-completed time on the idle stack, with its CPU per job."""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid

import redis
from sqlalchemy import select

from bench import stack
from bench.bare import COUNTER_KEY, FIRST_QUEUE, SECOND_QUEUE, bare_chain, create_app
from bench.context import TEXT_JOB, Context, submit_many, wait_completed
from bench.report import figure, spread
from pipeline.db import aware_utc
from pipeline.tables import jobs
from service.stack import free_port
from tests.builders import make_company

SHAPE = {"pool": "prefork", "concurrency": 2}
SINGLES = 5  # one-at-a-time jobs per repetition, for the idle latency


@contextlib.contextmanager
def broker(kind: str):
    """(broker URL, key prefix) of the run's own on Redis or RabbitMQ."""
    if kind == "redis":
        with stack.scratch_prefix() as prefix:
            yield stack.REDIS_URL, prefix
    else:
        with stack.rabbitmq_vhost() as url:
            yield url, ""


@contextlib.contextmanager
def pipeline_stack(ctx: Context, kind: str, **extra_env):
    """gunicorn, a pipeline worker and a local worker (prefork, 2 children each), and the
    reference's two workers of the same shape, on one scratch database and broker."""
    folder = ctx.folder(f"throughput-{kind}-{len(extra_env)}")
    procs = []
    with stack.scratch_database("bench") as pg, broker(kind) as (url, prefix):
        env = stack.bench_env(folder, pg, prefix, CELERY_BROKER_URL=url, **extra_env)
        runtime = stack.runtime_for(env)
        bare_prefix = f"{prefix}bare:" if prefix else f"cp-bench-{uuid.uuid4().hex[:8]}:"
        bare_env = {"BENCH_BROKER_URL": url, "BENCH_BROKER_PREFIX": prefix and bare_prefix,
                    "BENCH_COUNTER_URL": stack.REDIS_URL}
        try:
            api = stack.gunicorn_api(env, free_port(), folder / "api.log")
            procs.append(api)
            procs.append(stack.worker("tasks.worker", env, ["pipeline"],
                                      folder / "pipeline.log", name="pipeline", **SHAPE))
            procs.append(stack.worker("tasks.worker", env, ["local"], folder / "local.log",
                                      name="local", **SHAPE))
            bare = [stack.worker("bench.bare", bare_env, [FIRST_QUEUE], folder / "bare1.log",
                                 name="bare1", **SHAPE),
                    stack.worker("bench.bare", bare_env, [SECOND_QUEUE],
                                 folder / "bare2.log", name="bare2", **SHAPE)]
            procs.extend(bare)
            yield {"env": env, "runtime": runtime, "api": api, "ours": procs[:3],
                   "bare": bare, "bare_app": create_app(url, prefix and bare_prefix),
                   "counter_prefix": bare_prefix}
        finally:
            for proc in reversed(procs):
                proc.stop()
            runtime.engine.dispose()
            counter = redis.Redis.from_url(stack.REDIS_URL)
            counter.delete(bare_prefix + COUNTER_KEY)


def _cpu(procs) -> float:
    return sum(p.cpu_seconds() for p in procs)


def run_ours(s, company, count: int, done_before: int) -> tuple[float, float]:
    """(jobs/s, CPU ms per job of API and workers) for `count` jobs submitted at once."""
    cpu0, start = _cpu(s["ours"]), time.monotonic()
    submit_many(s["api"].url, company.api_key, count)
    end = wait_completed(s["runtime"].engine, company.company_id, done_before + count)
    return count / (end - start), (_cpu(s["ours"]) - cpu0) * 1000 / count


def run_bare(s, count: int) -> tuple[float, float]:
    """(chains/s, CPU ms per chain of the two workers) for `count` chains published at once."""
    counter = redis.Redis.from_url(stack.REDIS_URL)
    key = s["counter_prefix"] + COUNTER_KEY
    counter.set(key, 0)
    app = s["bare_app"]
    cpu0, start = _cpu(s["bare"]), time.monotonic()
    with app.producer_or_acquire() as producer:
        for n in range(count):
            bare_chain(app, f"bare-{n}", s["counter_prefix"]).apply_async(producer=producer)
    deadline = time.monotonic() + 300
    while int(counter.get(key) or 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bare chains: {counter.get(key)} of {count} after 300s")
        time.sleep(0.02)
    end = time.monotonic()
    return count / (end - start), (_cpu(s["bare"]) - cpu0) * 1000 / count


def one_job_latency(s, company, body=TEXT_JOB) -> float:
    """Submit one job on the idle stack; ms from its creation to its completion (the
    database's own timestamps, so the poll's interval does not count)."""
    [job_id] = submit_many(s["api"].url, company.api_key, 1, threads=1, label="single",
                           body=body)
    engine = s["runtime"].engine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            row = conn.execute(select(jobs.c.status, jobs.c.created_at, jobs.c.completed_at)
                               .where(jobs.c.id == job_id)).one()
        if row.status == "completed":
            return (aware_utc(row.completed_at) - aware_utc(row.created_at)).total_seconds() \
                * 1000
        time.sleep(0.01)
    raise RuntimeError(f"single job {job_id} not completed: {row.status}")


def measure(ctx: Context, kind: str, *, task_events: bool = False) -> dict:
    """`task_events`: the pipeline's workers send Celery's task events (TASK_EVENTS=1, what
    Flower turns on), the reference does not: their cost, beside throughput_<kind>."""
    ctx.log(f"throughput on {kind}{' with task events' if task_events else ''}: "
            f"{ctx.repetitions} x {ctx.jobs} jobs, interleaved")
    extra = {"TASK_EVENTS": "1"} if task_events else {}
    with pipeline_stack(ctx, kind, **extra) as s:
        company = make_company(s["runtime"].engine, credits=10**9)
        done = 0
        # Warm-up: connections, imports and caches of every process, not timed.
        warm = min(20, ctx.jobs)
        run_bare(s, warm)
        run_ours(s, company, warm, done)
        done += warm
        ours, bare, ours_cpu, bare_cpu, singles = [], [], [], [], []
        for rep in range(ctx.repetitions):
            rate, cpu = run_bare(s, ctx.jobs)
            bare.append(rate)
            bare_cpu.append(cpu)
            rate, cpu = run_ours(s, company, ctx.jobs, done)
            done += ctx.jobs
            ours.append(rate)
            ours_cpu.append(cpu)
            time.sleep(1)  # let the stack go idle
            cpu0 = _cpu(s["ours"])
            singles.append(statistics.median(
                one_job_latency(s, company) for _ in range(SINGLES)))
            done += SINGLES
            idle_cpu = (_cpu(s["ours"]) - cpu0) * 1000 / SINGLES
            ctx.log(f"  rep {rep + 1}: bare {bare[-1]:.1f}/s ({bare_cpu[-1]:.1f} ms CPU), "
                    f"ours {ours[-1]:.1f}/s ({ours_cpu[-1]:.1f} ms CPU), one job "
                    f"{singles[-1]:.0f} ms, {idle_cpu:.0f} ms CPU")
    shape = {"jobs_per_repetition": ctx.jobs, "submit_clients": 8,
             "api": "gunicorn gthread, 2 workers x 4 threads",
             "workers": "pipeline queue + local queue, prefork 2 children each; the "
                        "reference: the same two nodes of bench.bare"}
    if task_events:
        return {f"throughput_{kind}_task_events": figure(
            "jobs/s", ours, bare, reference_name="bare 4-task chain (no events)",
            target="compare its ratio with throughput_" + kind, met=None,
            extra={"settings": {**shape, "TASK_EVENTS": "1 (pipeline workers only)"},
                   "cpu_per_job_ms": spread(ours_cpu)})}
    return {
        f"throughput_{kind}": figure(
            "jobs/s", ours, bare, reference_name="bare 4-task chain",
            target="ratio >= 0.5", met=lambda f: f["ratio"]["median"] >= 0.5,
            extra={"settings": shape}),
        f"cpu_per_job_{kind}": figure(
            "ms CPU", ours_cpu, bare_cpu, reference_name="bare chain CPU", better="lower",
            target="see peer_litellm", met=None,
            extra={"note": "API + both worker nodes (all their processes), under load; "
                           "PostgreSQL's and Redis's CPU not included"}),
        f"one_job_latency_{kind}": figure(
            "ms", singles, None, reference_name="-", better="lower",
            target="", met=None,
            extra={"note": "created_at to completed_at of one job on the idle stack, "
                           f"median of {SINGLES} per repetition"}),
    }
