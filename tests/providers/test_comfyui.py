"""ComfyUIProvider against one or two fake ComfyUI instances over real HTTP."""

from __future__ import annotations

import json
import struct
import time
import uuid

import pytest
import requests
import websocket

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import NotConfiguredError, RejectedError, TransientError
from providers.comfyui import ComfyUIProvider, prompt_id_for
from providers.comfyui_progress import ws_url
from tests.fakes.base import Reply
from tests.fakes.comfyui import FakeComfyUI, ws_accept
from tests.fakes.media import PNG_SIGNATURE

JOB = "5b0e4c8e-9a1d-4f3e-8c57-2d6f1e0a9b31"
# API-NOTES 6.8: a graph that needs no model weights.
SMOKE = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 32, "batch_size": 1, "color": 16711680},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke"}},
}


@pytest.fixture
def fake():
    with FakeComfyUI() as server:
        yield server


@pytest.fixture
def other():
    with FakeComfyUI() as server:
        yield server


def job(job_id=JOB, content_type="image", prompt="a red fox in snow", **settings):
    return GenerationRequest(job_id, content_type, prompt, settings)


def wait_for(provider, request, remote_id, seconds=5.0) -> Output:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = provider.check(request, remote_id)
        if isinstance(result, Output):
            return result
        time.sleep(0.01)
    raise AssertionError(f"{remote_id} still pending")


def wait_until(condition, seconds=5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def prompts_for(server, prompt_id):
    return [r for r in server.received("prompt") if r.json().get("prompt_id") == prompt_id]


def test_default_sdxl_graph_runs_and_the_png_comes_back(fake):
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(width=512, height=768, steps=30, seed=11, negativePrompt="blurry")
    pending = provider.start(request)
    assert isinstance(pending, Pending)
    assert pending.remote_id == f"{fake.url}|{JOB}"  # our job id is ComfyUI's prompt id
    out = wait_for(provider, request, pending.remote_id)
    assert out.data.startswith(PNG_SIGNATURE)
    assert png_size(out.data) == (512, 768)
    assert (out.mime_type, out.extension, out.usage) == ("image/png", "png", {"runs": 1})
    assert out.metadata["filename"] == f"{JOB}_00001_.png"
    graph = prompts_for(fake, JOB)[0].json()["prompt"]
    assert graph["3"]["inputs"]["steps"] == 30
    assert graph["3"]["inputs"]["seed"] == 11
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["9"]["inputs"]["filename_prefix"] == f"pipeline/{JOB}"


def test_a_callers_own_workflow_runs_as_given(fake):
    provider = ComfyUIProvider(fake.url, timeout=2)
    request = job(workflow=SMOKE)
    out = wait_for(provider, request, provider.start(request).remote_id)
    assert png_size(out.data) == (64, 32)
    assert out.metadata["filename"] == "smoke_00001_.png"


def test_the_api_prefixed_routes_work_too(fake):
    provider = ComfyUIProvider([f"{fake.url}/api"], timeout=2)
    request = job(workflow=SMOKE)
    assert wait_for(provider, request, provider.start(request).remote_id).usage == {"runs": 1}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"checkpoint": "nope.safetensors"},
            r"node 4 \(CheckpointLoaderSimple\): Value not in list: ckpt_name: 'nope.safetensors'",
        ),
        ({"workflow": {"1": {"class_type": "Mystery", "inputs": {}}}}, "Node 'Mystery' not found"),
        ({"workflow": {"1": SMOKE["1"]}}, "Prompt has no outputs"),
        ({"workflow": {"2": SMOKE["2"]}}, r"node 2 \(SaveImage\): Bad linked input"),
    ],
)
def test_validation_failures_are_readable_rejections(fake, settings, message):
    with pytest.raises(RejectedError, match=message) as raised:
        ComfyUIProvider([fake.url], timeout=2).start(job(**settings))
    assert raised.value.status == 400


def test_the_least_loaded_instance_gets_the_job(fake, other):
    for server, load in ((fake, 3), (other, 1)):
        server.config["paused"] = True
        for _ in range(load):
            server.enqueue(SMOKE)
    provider = ComfyUIProvider([fake.url, other.url], timeout=2)
    pending = provider.start(job())
    assert pending.remote_id == f"{other.url}|{JOB}"
    assert JOB in [item[1] for item in other.pending]
    second = provider.start(job(job_id=str(uuid.uuid4())))  # other now holds 2, fake 3
    assert second.remote_id.startswith(other.url)
    third = provider.start(job(job_id=str(uuid.uuid4())))  # 3 and 3: the first listed wins
    assert third.remote_id.startswith(fake.url)


def test_a_queued_job_is_not_submitted_twice(fake, other):
    fake.config["paused"] = True
    provider = ComfyUIProvider([other.url, fake.url], timeout=2)
    other.enqueue(SMOKE)  # make fake the less loaded one
    first = provider.start(job())
    again = provider.start(job())  # a restarted worker calls start again
    assert again.remote_id == first.remote_id == f"{fake.url}|{JOB}"
    assert again.status == "queued"
    assert len(prompts_for(fake, JOB)) == 1
    assert prompts_for(other, JOB) == []


def test_a_finished_job_is_not_submitted_again(fake, other):
    provider = ComfyUIProvider([fake.url, other.url], timeout=2)
    request = job()
    first = provider.start(request)
    wait_for(provider, request, first.remote_id)
    other.config["paused"] = True  # fake is now busier than other, which stays empty
    fake.config["paused"] = True
    fake.enqueue(SMOKE)
    again = provider.start(request)
    assert again.remote_id == first.remote_id
    assert len(prompts_for(fake, JOB)) == 1
    assert prompts_for(other, JOB) == []
    assert wait_for(provider, request, again.remote_id).data.startswith(PNG_SIGNATURE)


def test_non_uuid_job_ids_map_to_one_stable_prompt_id(fake):
    assert prompt_id_for("job-7") == prompt_id_for("job-7") != prompt_id_for("job-8")
    assert prompt_id_for(JOB.upper()) == JOB
    fake.config["paused"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    first = provider.start(job(job_id="job-7"))
    assert provider.start(job(job_id="job-7")).remote_id == first.remote_id
    assert len(fake.received("prompt")) == 1


def test_cancel_interrupts_the_running_prompt_by_id(fake):
    fake.config["hold"] = True
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    wait_until(lambda: fake.running is not None)
    assert provider.check(request, pending.remote_id).status == "running"
    provider.cancel(request, pending.remote_id)
    assert fake.interrupted == [JOB]
    wait_until(lambda: JOB in fake.history)
    with pytest.raises(RejectedError, match="interrupted"):
        provider.check(request, pending.remote_id)


def test_cancel_deletes_a_pending_prompt_without_interrupting_others(fake):
    fake.config.update(paused=True)
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    provider.cancel(request, pending.remote_id)
    assert fake.pending == []
    assert fake.interrupted == []
    with pytest.raises(RejectedError, match="does not know"):
        provider.check(request, pending.remote_id)


def test_an_execution_error_is_a_rejection_with_the_exception(fake):
    fake.config["error"] = "CUDA out of memory"
    provider = ComfyUIProvider([fake.url], timeout=2)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    wait_until(lambda: JOB in fake.history)
    with pytest.raises(RejectedError, match=r"KSampler .* RuntimeError: CUDA out of memory"):
        provider.check(request, pending.remote_id)


def test_an_unreachable_instance_is_skipped(fake, other):
    dead = other.url
    other.stop()
    provider = ComfyUIProvider([dead, fake.url], timeout=1)
    assert provider.start(job()).remote_id.startswith(fake.url)


def test_no_instance_answering_is_transient(fake):
    fake.push("history", fake.slow(2.0))
    provider = ComfyUIProvider([fake.url], timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TransientError, match="no instance answered"):
        provider.start(job())
    assert time.monotonic() - started < 1.5


def test_a_slow_poll_is_a_transient_timeout(fake):
    fake.config["paused"] = True
    provider = ComfyUIProvider([fake.url], timeout=0.3)
    pending = provider.start(job())
    fake.push("history", fake.slow(2.0))
    with pytest.raises(TransientError, match=r"within 0\.3s"):
        provider.check(job(), pending.remote_id)


def test_a_server_error_on_submit_is_transient(fake):
    fake.push("prompt", Reply(500, "Internal Server Error"))
    with pytest.raises(TransientError):
        ComfyUIProvider([fake.url], timeout=2).start(job())


def test_no_instances_is_not_configured():
    with pytest.raises(NotConfiguredError):
        ComfyUIProvider([])


@pytest.mark.parametrize(
    ("content_type", "settings", "name"),
    [
        ("image", {"width": 1001}, "width"),
        ("image", {"height": 32}, "height"),
        ("image", {"steps": 0}, "steps"),
        ("image", {"sampler": "magic"}, "sampler"),
        ("image", {"cfg": "high"}, "cfg"),
        ("image", {"workflow": "not a graph"}, "workflow"),
        ("image", {"workflow": {"nodes": [], "links": []}}, "workflow"),  # a UI-format export
        ("video", {}, "workflow"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(content_type, settings, name):
    provider = ComfyUIProvider(["http://unused"])
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage(content_type, "prompt", settings)


def test_estimate_is_one_run():
    provider = ComfyUIProvider(["http://unused"])
    assert provider.estimate_usage("image", "p", {}) == {"runs": 1}
    assert provider.estimate_usage("video", "p", {"workflow": SMOKE}) == {"runs": 1}


# Progress over the websocket (API-NOTES 6.7) ------------------------------------------------


def progress_provider(fake) -> tuple[ComfyUIProvider, str]:
    # Listeners are shared per instance URL and clientId: a clientId of its own per test.
    client_id = f"test-{uuid.uuid4().hex}"
    return ComfyUIProvider([fake.url], timeout=2, client_id=client_id), client_id


def poll(provider, request, remote_id, during=None, seconds=8.0) -> tuple[list, Output]:
    """Every check() until the Output: (the progress of each Pending, the Output)."""
    seen: list[float | None] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = provider.check(request, remote_id)
        if isinstance(result, Output):
            return seen, result
        assert isinstance(result, Pending)
        assert result.remote_id == remote_id
        seen.append(result.progress)
        if during:
            during(seen)
        time.sleep(0.02)
    raise AssertionError(f"{remote_id} still pending")


def test_the_fake_websocket_handshake_follows_rfc_6455():
    assert ws_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # 1.3's example


def test_the_fake_websocket_sends_a_prompts_events_only_to_its_client(fake):
    ws = websocket.create_connection(f"ws{fake.url[4:]}/api/ws?clientId=abc", timeout=2)
    bystander = websocket.create_connection(f"ws{fake.url[4:]}/ws?clientId=xyz", timeout=2)
    try:
        assert json.loads(ws.recv()) == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"},
        }
        assert json.loads(bystander.recv())["data"]["sid"] == "xyz"
        body = {"prompt": SMOKE, "client_id": "abc", "prompt_id": JOB}
        assert requests.post(f"{fake.url}/prompt", json=body, timeout=2).ok
        events = []
        while not events or events[-1] != ("executing", None):
            message = json.loads(ws.recv())
            assert message["data"]["prompt_id"] == JOB
            events.append((message["type"], message["data"].get("node")))
        assert events == [
            ("execution_start", None),
            ("execution_cached", None),
            ("executing", "1"),
            ("progress", "1"),
            ("executed", "2"),
            ("execution_success", None),
            ("executing", None),
        ]
        bystander.settimeout(0.2)
        with pytest.raises(websocket.WebSocketTimeoutException):
            bystander.recv()
    finally:
        ws.close()
        bystander.close()
    assert fake.ws_clients == ["abc", "xyz"]


def test_check_reports_websocket_progress_while_the_prompt_runs(fake):
    fake.config["run_seconds"] = 1.0
    provider, client_id = progress_provider(fake)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    seen, out = poll(provider, request, pending.remote_id)
    values = [p for p in seen if p is not None]
    assert any(0 < p < 1 for p in values), seen
    assert values == sorted(values)
    assert all(0 <= p <= 1 for p in values)
    assert png_size(out.data) == (64, 32)
    # ComfyUI sends progress only to the socket of the clientId the prompt was sent with.
    assert prompts_for(fake, JOB)[0].json()["client_id"] == client_id
    assert fake.ws_clients == [client_id]


def test_without_a_websocket_progress_is_none_and_polling_still_works(fake):
    fake.config.update(run_seconds=0.5, websocket=False)
    assert requests.get(f"{fake.url}/ws", timeout=2).status_code == 404
    provider, _ = progress_provider(fake)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    seen, out = poll(provider, request, pending.remote_id)
    assert seen
    assert set(seen) == {None}
    assert png_size(out.data) == (64, 32)
    assert fake.ws_clients == []


@pytest.mark.parametrize("comes_back", [True, False])
def test_a_websocket_dropped_mid_run_does_not_break_check(fake, comes_back):
    fake.config["run_seconds"] = 1.5
    provider, client_id = progress_provider(fake)
    request = job(workflow=SMOKE)
    pending = provider.start(request)
    dropped_at: list[float] = []

    def drop_once(seen):
        if not dropped_at and seen[-1] is not None and seen[-1] < 0.5:
            fake.config["websocket"] = comes_back
            assert fake.drop_websockets() == 1
            dropped_at.append(seen[-1])

    seen, out = poll(provider, request, pending.remote_id, during=drop_once)
    assert dropped_at, seen
    assert png_size(out.data) == (64, 32)
    after = [p for p in seen[seen.index(dropped_at[0]) :] if p is not None]
    if comes_back:  # the listener reconnected (same clientId) and progress went on
        assert fake.ws_clients == [client_id, client_id]
        assert max(after) > dropped_at[0]
    else:  # the last value heard stays (at most one step was in flight); polling finished it
        assert fake.ws_clients == [client_id]
        assert None not in after
        assert max(after) < dropped_at[0] + 0.1  # 15 steps: never near 1


def test_websocket_urls_follow_the_instance_url():
    assert ws_url("http://gpu1:8188", "c1") == "ws://gpu1:8188/ws?clientId=c1"
    assert ws_url("https://gpu1/api/", "a b") == "wss://gpu1/api/ws?clientId=a+b"
