"""Every fake provider server also runs as `python -m tests.fakes.<name>` and is scriptable."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.provider import GenerationRequest
from pipeline.provider_errors import QuotaExhaustedError
from providers.openai import OpenAIProvider

ROOT = Path(__file__).resolve().parents[2]
FAKES = ["openai", "stability", "elevenlabs", "runway", "heygen", "comfyui"]


def start(name: str, *args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", f"tests.fakes.{name}", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    url = process.stdout.readline().strip()  # the fake prints its URL once it listens
    assert url.startswith("http://127.0.0.1:"), url
    return process, url


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=10)


@pytest.mark.parametrize("name", FAKES)
def test_each_fake_serves_as_a_subprocess_and_takes_control_calls(name):
    process, url = start(name)
    try:
        pushed = requests.post(
            f"{url}/__fake__/push", timeout=5, json={"route": "any", "reply": {"status": 418}}
        )
        assert pushed.status_code == 204
        assert requests.post(f"{url}/__fake__/config", json={"x": 1}, timeout=5).ok
        assert requests.get(f"{url}/__fake__/requests", timeout=5).json() == []
    finally:
        assert stop(process) == 0


def test_a_subprocess_fake_answers_the_adapter_and_runs_scenarios():
    process, url = start("openai", "--api-key", "sk-sub")
    try:
        provider = OpenAIProvider(base_url=f"{url}/v1", timeout=5)
        request = GenerationRequest("j", "text", "hi", {}, {"api_key": "sk-sub"})
        assert provider.start(request).data == b"Echo: hi"
        requests.post(
            f"{url}/__fake__/push", timeout=5, json={"route": "chat", "scenario": "quota_exhausted"}
        )
        with pytest.raises(QuotaExhaustedError):
            provider.start(request)
        seen = requests.get(f"{url}/__fake__/requests", timeout=5).json()
        assert [r["route"] for r in seen] == ["chat", "chat"]
    finally:
        assert stop(process) == 0


def test_the_comfyui_fake_runs_prompts_and_deletes_files_as_a_subprocess():
    process, url = start("comfyui")
    size = {"width": 16, "height": 16, "batch_size": 1, "color": 0}
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": size},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s"}},
    }
    try:
        body = {"prompt": graph, "prompt_id": "any string"}  # ComfyUI takes any string as id
        answer = requests.post(f"{url}/prompt", json=body, timeout=5).json()
        assert answer["prompt_id"] == "any string"
        history: dict = {}
        deadline = time.monotonic() + 10
        while not history and time.monotonic() < deadline:
            history = requests.get(f"{url}/history/any string", timeout=5).json()
            time.sleep(0.02)
        image = history["any string"]["outputs"]["2"]["images"][0]
        assert requests.get(f"{url}/view", params=image, timeout=5).status_code == 200
        deleted = requests.post(f"{url}/__fake__/delete_files", json={}, timeout=5)
        assert deleted.json() == {"deleted": 1}  # the test hook an operator's cleanup stands for
        assert requests.get(f"{url}/view", params=image, timeout=5).status_code == 404
    finally:
        assert stop(process) == 0
