"""A peer: the LiteLLM proxy in front of the same fake OpenAI server as our text jobs.

Its CPU per request and the latency it adds (through it minus straight to the fake),
against our CPU per text job (API and workers, ledger and stored output included) and
submit-to-completed time. LiteLLM lives in a virtualenv of its own (bench/.venv-litellm),
made by the full run when the network allows; otherwise the figure says why not.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench import stack
from bench.context import Context, submit_many, wait_completed
from bench.figures.slots import api_and_pipeline
from bench.figures.throughput import one_job_latency
from bench.report import figure, not_measured
from service.stack import free_port
from tests.fakes.openai import FakeOpenAI

VENV = Path(__file__).resolve().parent.parent / ".venv-litellm"
KEY = "sk-bench-peer"
MODEL = "gpt-4o-mini"
REQUESTS = 200


def litellm_binary() -> tuple[Path | None, str]:
    """The proxy's executable, installing it first if needed; (None, why) when it cannot."""
    binary = VENV / "bin" / "litellm"
    if binary.exists():
        return binary, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120,
                       capture_output=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]>=1.50,<2"],
                       check=True, timeout=600, capture_output=True, text=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        tail = getattr(exc, "stderr", "") or str(exc)
        return None, f"installing litellm[proxy] failed: {str(tail).strip()[-200:]}"
    return (binary, "") if binary.exists() else (None, "litellm not found after install")


def _chat(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("POST", path, body=json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hello peer"}],
         "max_tokens": 20}),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    answer = conn.getresponse()
    body = answer.read()
    if answer.status != 200:
        raise RuntimeError(f"chat answered {answer.status}: {body[:200]!r}")


def _timed(port: int, path: str, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        _chat(conn, path)
        times.append((time.perf_counter() - start) * 1000)
    conn.close()
    return times


def litellm_figures(ctx: Context, fake: FakeOpenAI, binary: Path) -> dict:
    folder = ctx.folder("peer")
    config = folder / "litellm.yaml"
    config.write_text(json.dumps({"model_list": [{"model_name": MODEL, "litellm_params": {
        "model": f"openai/{MODEL}", "api_base": f"{fake.url}/v1", "api_key": KEY}}]}))
    port = free_port()
    proxy = stack.Proc([str(binary), "--config", str(config), "--host", "127.0.0.1",
                        "--port", str(port), "--num_workers", "1"],
                       {"LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": KEY,
                        "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"},
                       folder / "litellm.log")
    try:
        def up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/health/liveliness",
                                    timeout=1).status_code == 200
            except requests.RequestException:
                return False

        proxy.wait_until(up, "the LiteLLM proxy", timeout=180)
        fake_port = int(fake.url.rsplit(":", 1)[1])
        _timed(port, "/v1/chat/completions", 20)  # warm-up
        direct, through, cpu = [], [], []
        for _ in range(ctx.repetitions):
            direct.append(statistics.median(_timed(fake_port, "/v1/chat/completions", 50)))
            before = proxy.cpu_seconds()
            through.append(statistics.median(_timed(port, "/v1/chat/completions", REQUESTS)))
            cpu.append((proxy.cpu_seconds() - before) * 1000 / REQUESTS)
    finally:
        proxy.stop()
    return {"cpu_ms": cpu, "added_ms": [t - d for t, d in zip(through, direct, strict=True)]}


def our_figures(ctx: Context, fake: FakeOpenAI) -> dict:
    """CPU per OpenAI text job (API + pipeline + SaaS worker) and one job's latency."""
    count = 100
    with api_and_pipeline(ctx, "peer-ours", OPENAI_BASE_URL=f"{fake.url}/v1",
                          OPENAI_API_KEY=KEY) as (env, runtime, api, company, folder, procs):
        procs.append(stack.worker("tasks.worker", env, ["saas.openai"], folder / "saas.log",
                                  name="saas", pool="threads", concurrency=4))
        body = {"contentType": "text", "provider": "openai", "settings": {"maxTokens": 20}}
        submit_many(api.url, company.api_key, 20, body=body)
        wait_completed(runtime.engine, company.company_id, 20)
        done, cpu, latency = 20, [], []
        for _ in range(ctx.repetitions):
            before = sum(p.cpu_seconds() for p in procs)
            submit_many(api.url, company.api_key, count, body=body)
            done += count
            wait_completed(runtime.engine, company.company_id, done)
            cpu.append((sum(p.cpu_seconds() for p in procs) - before) * 1000 / count)
            time.sleep(0.5)
            s = {"api": api, "runtime": runtime}
            latency.append(statistics.median(
                one_job_latency(s, company, body=body) for _ in range(5)))
            done += 5
    return {"cpu_ms": cpu, "latency_ms": latency}


def measure(ctx: Context) -> dict:
    binary, why = litellm_binary()
    if binary is None:
        return {"peer_litellm": not_measured(why)}
    ctx.log("peer: LiteLLM proxy and our text jobs, in front of the same fake OpenAI")
    fake = FakeOpenAI(api_key=KEY).start()
    try:
        peer = litellm_figures(ctx, fake, binary)
        ours = our_figures(ctx, fake)
    finally:
        fake.stop()
    version = subprocess.run([str(VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, check=False).stdout.strip()
    return {
        "peer_cpu_per_request": figure(
            "ms CPU", ours["cpu_ms"], peer["cpu_ms"],
            reference_name=f"LiteLLM {version} proxy CPU per request", better="lower",
            target="ratio <= 2", met=lambda f: f["ratio"]["median"] <= 2,
            extra={"note": "ours: API + pipeline worker + SaaS worker per OpenAI text job "
                           "(ledger, stored output); LiteLLM: the proxy process, one worker"}),
        "peer_latency": figure(
            "ms", ours["latency_ms"], peer["added_ms"],
            reference_name="latency LiteLLM adds", better="lower", target="", met=None,
            extra={"note": "ours: created_at to completed_at of one job on the idle stack "
                           "(the fake answers at once); LiteLLM: median through the proxy "
                           "minus median straight to the fake"}),
    }
