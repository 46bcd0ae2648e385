"""API latency at fixed offered rates from an open-loop generator: each request has a
scheduled send time (start + i / rate) and its latency is counted from that time, so a
server that falls behind shows the queue it built (no coordinated omission). The
reference is /healthz on the same server (no database, no broker)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench import stack
from bench.context import Context, submit_many
from bench.report import figure, percentile
from service.stack import free_port
from tests.builders import make_company

# What a kept-alive connection the server has just closed raises on its next request.
STALE = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)
SENDERS = 64  # enough that the generator never waits for a free client at 200/s


def open_loop(port: int, request, rate: float, seconds: float) -> list[float]:
    """Latencies (ms from the scheduled time) of rate*seconds requests; request(conn)
    sends one on a kept-alive connection and raises on an unexpected answer."""
    local = threading.local()
    count = int(rate * seconds)
    latencies: list[float] = [0.0] * count
    errors: list[str] = []

    def connect() -> http.client.HTTPConnection:
        local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        return local.conn

    def send(i: int, due: float) -> None:
        conn = getattr(local, "conn", None)
        reused = conn is not None
        try:
            try:
                request(conn if reused else connect())
            except STALE:
                if not reused:
                    raise
                # The server closed the idle kept-alive connection (gunicorn's keep-alive
                # timeout) as this request went out: it never arrived; send it anew.
                local.conn.close()
                request(connect())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            local.conn.close()
            local.conn = None
        latencies[i] = (time.monotonic() - due) * 1000

    with ThreadPoolExecutor(SENDERS) as pool:
        start = time.monotonic() + 0.05
        for i in range(count):
            due = start + i / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            pool.submit(send, i, due)
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} requests failed, e.g. {errors[0]}")
    return latencies


def _requests(api_key: str, job_id: str) -> dict:
    auth = {"Authorization": f"Bearer {api_key}"}
    body_headers = {**auth, "Content-Type": "application/json"}

    def expect(conn, status: int) -> bytes:
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != status:
            raise RuntimeError(f"answered {answer.status}: {data[:200]!r}")
        return data

    def healthz(conn):
        conn.request("GET", "/healthz")
        expect(conn, 200)

    def post(conn):
        conn.request("POST", "/v1/jobs", body=json.dumps(
            {"contentType": "text", "providerName": "local", "prompt": "latency"}),
            headers=body_headers)
        expect(conn, 202)

    def get(conn):
        conn.request("GET", f"/v1/jobs/{job_id}", headers=auth)
        expect(conn, 200)

    return {"healthz": healthz, "post_job": post, "get_job": get}


def measure(ctx: Context) -> dict:
    rates = (50, 200) if ctx.quick else (50, 100, 200)
    seconds = 3 if ctx.quick else 5
    reps = 1 if ctx.quick else ctx.repetitions
    ctx.log(f"API latency: {rates}/s offered, {seconds} s each, {reps} repetition(s)")
    folder = ctx.folder("latency")
    with stack.scratch_database("bench") as pg, stack.scratch_prefix() as prefix:
        env = stack.bench_env(folder, pg, prefix)
        runtime = stack.runtime_for(env)
        port = free_port()
        api = stack.gunicorn_api(env, port, folder / "api.log")
        try:
            company = make_company(runtime.engine, credits=10**9)
            [job_id] = submit_many(api.url, company.api_key, 1, threads=1)
            kinds = _requests(company.api_key, job_id)
            for request in kinds.values():  # warm-up: every gunicorn thread's connections
                open_loop(port, request, 50, 1)
            runs: dict = {}
            for _ in range(reps):
                for rate in rates:
                    for name, request in kinds.items():  # interleaved with the reference
                        cpu = api.cpu_seconds()
                        lat = open_loop(port, request, rate, seconds)
                        cpu = (api.cpu_seconds() - cpu) * 1000 / len(lat)
                        runs.setdefault((name, rate), []).append(
                            {**{p: percentile(lat, p) for p in (50, 95, 99)}, "cpu": cpu})
                        last = runs[(name, rate)][-1]
                        ctx.log(f"  {name} at {rate}/s: p50 {last[50]:.1f} p99 {last[99]:.1f}"
                                f" ms, {last['cpu']:.1f} ms API CPU per request")
        finally:
            api.stop()
            runtime.engine.dispose()
    out = {}
    for rate in rates:
        ref = runs[("healthz", rate)]
        for name in ("post_job", "get_job"):
            ours = runs[(name, rate)]
            target, met = "", None
            if name == "post_job" and rate == 200:
                target, met = "p99 <= 25 ms", lambda f: f["ours"]["median"] <= 25
            out[f"latency_{name}_p99_at_{rate}"] = figure(
                "ms p99", [r[99] for r in ours], [r[99] for r in ref],
                reference_name="/healthz p99", better="lower", target=target, met=met,
                extra={"p50": [round(r[50], 2) for r in ours],
                       "p95": [round(r[95], 2) for r in ours],
                       "reference_p50": [round(r[50], 2) for r in ref],
                       "api_cpu_ms_per_request": [round(r["cpu"], 2) for r in ours],
                       "reference_api_cpu_ms_per_request": [round(r["cpu"], 2) for r in ref],
                       "settings": {"offered_per_s": rate, "seconds": seconds,
                                    "api": "gunicorn gthread 2 x 4", "generator":
                                    f"open loop, {SENDERS} keep-alive clients"}})
    return out
