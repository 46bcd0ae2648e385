"""ComfyUI through real GPU workers against fakes with the real server's behaviours: its
execution cache, prompt ids it never deduplicates, 200 answers that carry node errors,
several instances shared by several slots, and prompts that never finish."""

from __future__ import annotations

import itertools
import threading
import time
import uuid

import pytest
from sqlalchemy import select

from pipeline import lifecycle
from pipeline.tables import job_attempts
from service.stack import free_port
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    wait_for,
    wait_terminal,
    wallet_of,
)
from tests.fakes.comfyui import FakeComfyUI

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

CREDITS = 100


def _graph(colour: int = 0x336699, *, broken_second_output: bool = False) -> dict:
    """A model-free graph, as a caller would export it: EmptyImage -> SaveImage."""
    graph = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": "caller"}},
    }
    if broken_second_output:  # an output whose input points at no node
        graph["3"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0],
                                                            "filename_prefix": "other"}}
    return graph


@pytest.fixture
def comfy():
    servers = [FakeComfyUI().start(), FakeComfyUI().start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def stack(comfy, api_stack):
    """stack(urls=None, **env) -> (env, runtime, API client, company), on the fakes."""

    def make(urls=None, **extra):
        return api_stack(CREDITS, COMFY_WORKER_URL=",".join(urls or [c.url for c in comfy]),
                         **{"POLL_INTERVAL_SECONDS": "0.1", **extra})

    return make


def _submit(client, company, settings=None, *, provider="comfyui"):
    body = {"contentType": "image", "prompt": "a lighthouse", "settings": settings or {}}
    if provider:
        body["provider"] = provider
    resp = client.post("/v1/jobs", headers=auth(company.api_key), json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


def _view(client, company, job_id):
    return client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()


def test_two_slots_on_two_instances_never_queue_on_one_while_the_other_idles(
        comfy, stack, start_worker):
    env, rt, client, company = stack()
    for server in comfy:
        server.config["run_seconds"] = 1.0
    depths: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            depths.append(tuple(len(c.pending) + (c.running is not None) for c in comfy))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_worker(env, queues=["pipeline"], concurrency=2)
    start_worker(env, queues=["gpu.comfyui"], concurrency=2, pool="prefork")
    ids = [_submit(client, company, {"seed": n, "steps": 2}) for n in range(6)]
    statuses = wait_terminal(rt.engine, ids, timeout=120)
    stop.set()
    sampler.join()
    assert set(statuses.values()) == {"completed"}
    assert max(max(d) for d in depths) == 1  # no prompt ever waited behind another
    assert all(len(c.history) >= 2 for c in comfy)  # both instances worked
    assert_wallet_matches_ledger(rt.engine, company.company_id)


class _Watch:
    """Samples a fake every few ms: when its k-th history entry appeared and when the k-th
    /view came, i.e. how long a finished prompt waited for a worker to notice it."""

    def __init__(self, server: FakeComfyUI):
        self.server, self.samples = server, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), len(self.server.history),
                                 len(self.server.received("view"))))
            time.sleep(0.005)

    def lags(self, count: int) -> list[float]:
        def first(column: int, k: int) -> float:
            return next(s[0] for s in self.samples if s[column] >= k)

        return [first(2, k) - first(1, k) for k in range(1, count + 1)]


def _run_one_by_one(server, stack, start_worker, count, **env):
    """`count` jobs of 0.3 s through one gpu slot at the default 3 s poll interval."""
    env, rt, client, company = stack(urls=[server.url], POLL_INTERVAL_SECONDS="3", **env)
    server.config["run_seconds"] = 0.3
    start_worker(env, queues=["pipeline"], concurrency=2)
    start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="prefork")
    with _Watch(server) as watch:
        for n in range(count):
            job_id = _submit(client, company, {"seed": n, "steps": 2})
            assert wait_terminal(rt.engine, [job_id], timeout=60)[job_id] == "completed"
    return watch.lags(count)


def test_a_finished_prompt_is_noticed_at_once_not_a_poll_interval_later(
        comfy, stack, start_worker):
    # GPU_POLL_SECONDS at the poll interval too: only the websocket can make this fast.
    lags = _run_one_by_one(comfy[0], stack, start_worker, 3, GPU_POLL_SECONDS="3")
    assert max(lags) < 0.5, lags  # polling alone: up to 3 s each


def test_without_the_websocket_a_finished_prompt_is_noticed_by_the_short_poll(
        comfy, stack, start_worker):
    server = comfy[0]
    server.config["websocket"] = False  # no /ws route (a proxy that drops upgrades): 404
    lags = _run_one_by_one(server, stack, start_worker, 3)
    assert max(lags) < 1.0, lags  # GPU_POLL_SECONDS (0.25), not POLL_INTERVAL_SECONDS (3)


def test_a_websocket_dropped_mid_prompt_falls_back_to_polling(comfy, stack, start_worker):
    server = comfy[0]
    env, rt, client, company = stack(urls=[server.url], POLL_INTERVAL_SECONDS="3")
    server.config["run_seconds"] = 1.5
    start_worker(env, queues=["pipeline"], concurrency=2)
    start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="prefork")
    with _Watch(server) as watch:
        job_id = _submit(client, company, {"steps": 3})
        wait_for(lambda: server.sockets and server.running is not None, timeout=30)
        server.config["websocket"] = False  # it cannot come back
        assert server.drop_websockets() >= 1
        assert wait_terminal(rt.engine, [job_id], timeout=60)[job_id] == "completed"
    assert watch.lags(1)[0] < 1.0, watch.lags(1)


def test_the_next_prompt_waits_queued_at_comfyui_so_the_gpu_never_idles(
        comfy, stack, start_worker):
    server = comfy[0]
    env, rt, client, company = stack(urls=[server.url], POLL_INTERVAL_SECONDS="3")
    server.config["run_seconds"] = 0.3
    depths: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            depths.append(len(server.pending) + (server.running is not None))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_worker(env, queues=["pipeline"], concurrency=2)
    # COMFYUI_PROMPTS_PER_INSTANCE=2 (the default): two gpu slots for the one instance.
    start_worker(env, queues=["gpu.comfyui"], concurrency=3, pool="prefork")
    ids = [_submit(client, company, {"seed": n, "steps": 2}) for n in range(6)]
    statuses = wait_terminal(rt.engine, ids, timeout=120)
    stop.set()
    sampler.join()
    assert set(statuses.values()) == {"completed"}
    assert max(depths) == 2  # one running, one queued behind it; never a third
    runs = sorted((_stamp(e, "execution_start"), _stamp(e, "execution_success"))
                  for e in server.history.values())
    gaps = [start - end for (_, end), (start, _) in itertools.pairwise(runs)]
    # Each next prompt was queued before the last one's output was downloaded and stored.
    assert sorted(gaps)[len(gaps) // 2] < 50, gaps  # ms, the median
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def _stamp(entry: dict, kind: str) -> int:
    return next(m[1]["timestamp"] for m in entry["status"]["messages"] if m[0] == kind)


def test_a_repeated_caller_graph_gets_its_own_output_every_time(comfy, stack, start_worker):
    env, rt, client, company = stack(urls=[comfy[0].url])
    start_worker(env, concurrency=4)
    first = _submit(client, company, {"workflow": _graph()})
    assert wait_terminal(rt.engine, [first])[first] == "completed"
    comfy[0].delete_files()  # ComfyUI's output folder cleaned up between the two
    second = _submit(client, company, {"workflow": _graph()})
    assert wait_terminal(rt.engine, [second])[second] == "completed"
    a, b = (_view(client, company, j)["result"] for j in (first, second))
    # Each job's files land in a folder of its own at ComfyUI, never a cached earlier one.
    assert a["metadata"]["prompt_id"] in a["metadata"]["subfolder"]
    assert b["metadata"]["prompt_id"] in b["metadata"]["subfolder"]
    assert a["metadata"]["subfolder"] != b["metadata"]["subfolder"]
    assert b["size"] > 0
    assert len(comfy[0].received("prompt")) == 2


def test_node_errors_on_a_200_fail_the_job_and_refund_it(comfy, stack, start_worker):
    env, rt, client, company = stack(urls=[comfy[0].url])
    start_worker(env, concurrency=4)
    job_id = _submit(client, company, {"workflow": _graph(broken_second_output=True)})
    assert wait_terminal(rt.engine, [job_id])[job_id] == "failed"
    view = _view(client, company, job_id)
    assert view["error"]["code"] == "PROVIDER_REJECTED"
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
    assert_wallet_matches_ledger(rt.engine, company.company_id)


def test_a_job_for_comfyui_never_completes_on_another_provider(stack, start_worker):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env, rt, client, company = stack(urls=[dead], ROUTE_IMAGE="comfyui,local",
                                     MAX_ATTEMPTS="2")
    start_worker(env, concurrency=4)
    named = _submit(client, company, {"workflow": _graph()})
    routed = _submit(client, company, {"workflow": _graph()}, provider=None)
    statuses = wait_terminal(rt.engine, [named, routed], timeout=120)
    assert statuses == {named: "failed", routed: "failed"}
    for job_id in (named, routed):
        view = _view(client, company, job_id)
        assert view["provider"] == "comfyui"
        assert view["error"]["code"] == "PROVIDER_UNAVAILABLE"
        with rt.engine.connect() as conn:
            providers = set(conn.scalars(select(job_attempts.c.provider)
                                         .where(job_attempts.c.job_id == job_id)))
        assert providers == {"comfyui"}
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS


def test_timed_out_and_cancelled_jobs_are_interrupted_under_the_threads_pool(
        comfy, stack, start_worker):
    server = comfy[0]
    env, rt, client, company = stack(urls=[server.url], COMFYUI_DEADLINE_SECONDS="3",
                                     STALE_AFTER_SECONDS="5")
    server.config["hold"] = True  # a prompt runs until it is interrupted
    try:
        start_worker(env, queues=["pipeline"], concurrency=2)
        start_worker(env, queues=["gpu.comfyui"], concurrency=1, pool="threads")
        timed_out = _submit(client, company, {"workflow": _graph(1)})
        assert wait_terminal(rt.engine, [timed_out], timeout=60)[timed_out] == "failed"
        assert _view(client, company, timed_out)["error"]["code"] == "PROVIDER_TIMEOUT"
        wait_for(lambda: len(server.interrupted) == 1, timeout=10)

        cancelled = _submit(client, company, {"workflow": _graph(2)})
        wait_for(lambda: server.running is not None, timeout=30)
        lifecycle.fail(rt.engine, uuid.UUID(cancelled), code="CANCELLED",
                       message="cancelled by test", status="cancelled")  # as a client's cancel
        wait_for(lambda: len(server.interrupted) == 2, timeout=15)
    finally:
        server.config["hold"] = False
    wait_for(lambda: server.running is None, timeout=10)
    assert wallet_of(rt.engine, company.company_id).credits_available == CREDITS
    assert_wallet_matches_ledger(rt.engine, company.company_id)
