"""How well the workers keep slow providers busy.

GPU: a fake ComfyUI whose every prompt takes a fixed 300 ms, 200 jobs on one instance
and then on two, at the default settings (a GPU worker slot per prompt an instance holds),
the gpu worker started on the full backlog: busy time over wall time. SaaS: a fake OpenAI whose
chat call takes 2 s and counts the calls it holds open, one SaaS node at concurrency
100: mean calls in flight against the configured concurrency, while work waits.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from sqlalchemy import func, select

from bench import stack
from bench.context import Context, submit_many, wait_completed
from bench.report import figure
from pipeline.tables import jobs
from service.stack import free_port
from tests.builders import make_company
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.openai import FakeOpenAI

GPU_SECONDS = 0.3
# Taken at the defaults: the websocket's "prompt ended" wakes the worker (no poll interval),
# and COMFYUI_PROMPTS_PER_INSTANCE (2) prompts per instance, so the gpu worker gets that many
# slots per instance. Set COMFYUI_PROMPTS_PER_INSTANCE in the bench's environment to compare.
GPU_PROMPTS_PER_INSTANCE = int(os.environ.get("COMFYUI_PROMPTS_PER_INSTANCE") or 2)
SAAS_SECONDS = 2.0
SAAS_CONCURRENCY = 100
OPENAI_KEY = "sk-bench-openai"


@contextlib.contextmanager
def api_and_pipeline(ctx: Context, name: str, **extra):
    """A scratch database and prefix, gunicorn, and the pipeline queue's worker."""
    folder = ctx.folder(name)
    with stack.scratch_database("bench") as pg, stack.scratch_prefix() as prefix:
        env = stack.bench_env(folder, pg, prefix, **extra)
        runtime = stack.runtime_for(env)
        procs = []
        try:
            procs.append(stack.gunicorn_api(env, free_port(), folder / "api.log"))
            procs.append(stack.worker("tasks.worker", env, ["pipeline"],
                                      folder / "pipeline.log", name="pipeline"))
            company = make_company(runtime.engine, credits=10**9)
            yield env, runtime, procs[0], company, folder, procs
        finally:
            for proc in reversed(procs):
                proc.stop()
            runtime.engine.dispose()


class BusyClock:
    """Samples whether each fake ComfyUI runs a prompt, every millisecond."""

    def __init__(self, servers):
        self.servers = servers
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(),
                                 sum(s.running is not None for s in self.servers)))
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def utilisation(self) -> float:
        """Busy slots over available slots, from the first prompt's start to the last's end."""
        busy = [i for i, (_, n) in enumerate(self.samples) if n]
        if not busy:
            return 0.0
        window = self.samples[busy[0]:busy[-1] + 1]
        return sum(n for _, n in window) / (len(window) * len(self.servers))


def gpu(ctx: Context) -> dict:
    count = 40 if ctx.quick else 200
    ctx.log(f"GPU slots: {count} jobs of {GPU_SECONDS}s on one ComfyUI, then two")
    results, per = {}, GPU_PROMPTS_PER_INSTANCE
    for instances in (1, 2):
        servers = [FakeComfyUI().start() for _ in range(instances)]
        for server in servers:
            server.config["run_seconds"] = GPU_SECONDS
        try:
            with api_and_pipeline(ctx, f"gpu-{instances}",
                                  COMFY_WORKER_URL=",".join(s.url for s in servers),
                                  COMFYUI_PROMPTS_PER_INSTANCE=str(per)) as (
                    env, runtime, api, company, folder, procs):
                body = {"contentType": "image", "provider": "comfyui",
                        "settings": {"steps": 2}}
                submit_many(api.url, company.api_key, count, body=body, label="gpu")
                _wait_reserved(runtime.engine, company.company_id, count)
                # As for SaaS: the slots start on a full backlog, so the figure is the GPU
                # slots' and not how fast two shared cores take submissions.
                with BusyClock(servers) as clock:
                    start = time.monotonic()
                    procs.append(stack.worker("tasks.worker", env, ["gpu.comfyui"],
                                              folder / "gpu.log", name="gpu",
                                              concurrency=instances * per))
                    wait_completed(runtime.engine, company.company_id, count, timeout=600)
                    wall = time.monotonic() - start
                results[instances] = (clock.utilisation(), wall)
                ctx.log(f"  {instances} instance(s): utilisation "
                        f"{results[instances][0]:.3f}, {wall:.1f} s for {count} jobs")
        finally:
            for server in servers:
                server.stop()
    ideal = {n: count * GPU_SECONDS / n for n in results}
    return {f"gpu_utilisation_{n}_instance{'s' if n > 1 else ''}": figure(
        "busy/wall", [results[n][0]], [1.0], reference_name="ideal",
        target=">= 0.97", met=lambda f: f["ours"]["median"] >= 0.97,
        extra={"wall_s": round(results[n][1], 2), "ideal_wall_s": ideal[n],
               "settings": {"jobs": count, "prompt_seconds": GPU_SECONDS,
                            "POLL_INTERVAL_SECONDS": "3 (default)",
                            "COMFYUI_PROMPTS_PER_INSTANCE": per,
                            "before_websocket_wait": "0.105 at the default poll, 1 instance",
                            "gpu_worker": f"prefork {n * per} ({per} slots per instance), "
                                          "started on the full backlog"}})
        for n in results}


class CountingOpenAI(FakeOpenAI):
    """FakeOpenAI whose chat calls take SAAS_SECONDS and are logged as (start, end)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, float]] = []
        self._calls_lock = threading.Lock()

    def handle_chat(self, request):
        start = time.monotonic()
        time.sleep(SAAS_SECONDS)
        reply = super().handle_chat(request)
        with self._calls_lock:
            self.calls.append((start, time.monotonic()))
        return reply


def mean_in_flight(calls: list[tuple[float, float]]) -> float:
    """Time-weighted calls open, from the first call's start to the last call's start:
    the span in which every call still to come was already waiting for a slot."""
    starts = sorted(s for s, _ in calls)
    lo, hi = starts[0], starts[-1]
    if hi <= lo:
        return float(len(calls))
    open_time = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in calls)
    return open_time / (hi - lo)


def saas(ctx: Context) -> dict:
    count = SAAS_CONCURRENCY * (2 if ctx.quick else 4)
    ctx.log(f"SaaS concurrency: {ctx.repetitions} x {count} calls of {SAAS_SECONDS}s, one "
            f"node at {SAAS_CONCURRENCY}")
    fake = CountingOpenAI(api_key=OPENAI_KEY).start()
    means, cpu_ms = [], []
    try:
        with api_and_pipeline(ctx, "saas", OPENAI_BASE_URL=f"{fake.url}/v1",
                              OPENAI_API_KEY=OPENAI_KEY) as (
                env, runtime, api, company, folder, _procs):
            body = {"contentType": "text", "provider": "openai",
                    "settings": {"maxTokens": 20}}
            for rep in range(ctx.repetitions):
                submit_many(api.url, company.api_key, count, body=body, label=f"saas {rep}")
                _wait_reserved(runtime.engine, company.company_id, count * (rep + 1))
                fake.calls.clear()
                # Every call now waits in the queue; the node starts on a full backlog.
                node = stack.worker("tasks.worker", env, ["saas.openai"],
                                    folder / f"saas-{rep}.log", name="saas", pool="threads",
                                    concurrency=SAAS_CONCURRENCY)
                try:
                    cpu_at_ready = node.cpu_seconds()
                    wait_completed(runtime.engine, company.company_id, count * (rep + 1),
                                   timeout=600)
                    cpu_ms.append(round((node.cpu_seconds() - cpu_at_ready) * 1000 / count, 2))
                finally:
                    node.stop()
                means.append(mean_in_flight(fake.calls))
                ctx.log(f"  rep {rep + 1}: mean in flight {means[-1]:.1f} of "
                        f"{SAAS_CONCURRENCY}, node CPU {cpu_ms[-1]} ms per call")
    finally:
        fake.stop()
    return {"saas_in_flight": figure(
        "calls in flight", means, [SAAS_CONCURRENCY] * len(means), reference_name="configured",
        target="ratio >= 0.9", met=lambda f: f["ratio"]["median"] >= 0.9,
        extra={"node_cpu_ms_per_call": cpu_ms,
               "settings": {"calls": count, "call_seconds": SAAS_SECONDS,
                            "saas_worker": f"threads pool, concurrency {SAAS_CONCURRENCY}"}})}


def _wait_reserved(engine, company_id, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            held = conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.company_id == company_id, jobs.c.reserved_at.is_not(None))).scalar_one()
        if held >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"only {held} of {count} jobs reserved after {timeout}s")
