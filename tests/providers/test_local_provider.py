"""The local provider as the pipeline sees it: the Provider protocol, estimates, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.provider import CONTENT_TYPES, GenerationRequest, Output, Provider
from pipeline.provider_errors import ProviderError, RejectedError
from providers.local import LocalProvider

SMALL_SETTINGS = {
    "text": {"maxTokens": 40},
    "image": {"width": 96, "height": 64},
    "audio": {"speed": 300},
    "video": {"duration": 1, "width": 96, "height": 64, "fps": 4},
}


def make_request(content_type: str, prompt: str = "A quiet harbour at dawn") -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1",
        content_type=content_type,
        prompt=prompt,
        settings=SMALL_SETTINGS[content_type] | {"someOtherProvidersSetting": "ignored"},
    )


def test_is_the_local_provider_for_every_content_type() -> None:
    provider: Provider = LocalProvider()

    assert provider.name == "local"
    assert provider.content_types == frozenset(CONTENT_TYPES)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_start_returns_an_output_never_above_its_estimate(content_type: str) -> None:
    provider = LocalProvider()
    request = make_request(content_type)

    estimate = provider.estimate_usage(content_type, request.prompt, request.settings)
    output = provider.start(request)

    assert isinstance(output, Output)
    assert output.data
    assert output.metadata["development"] is True
    assert output.usage.keys() == estimate.keys()
    assert all(output.usage[unit] <= estimate[unit] for unit in estimate)


def test_an_unknown_content_type_is_rejected() -> None:
    with pytest.raises(RejectedError, match="3d-model"):
        LocalProvider().estimate_usage("3d-model", "a teapot", {})


def test_settings_that_are_not_an_object_are_rejected() -> None:
    request = GenerationRequest(job_id="j", content_type="text", prompt="p", settings=[1])  # type: ignore[arg-type]

    with pytest.raises(RejectedError, match="settings"):
        LocalProvider().start(request)


def test_rejections_carry_the_provider_name_and_the_stable_code() -> None:
    with pytest.raises(RejectedError) as caught:
        LocalProvider().estimate_usage("image", "p", {"width": 10})

    assert caught.value.provider == "local"
    assert caught.value.code == "PROVIDER_REJECTED"
    assert not caught.value.retryable


def test_check_has_nothing_to_poll_and_cancel_has_nothing_to_stop() -> None:
    provider = LocalProvider()
    request = make_request("text")

    with pytest.raises(ProviderError, match="synchronous"):
        provider.check(request, "remote-1")
    assert provider.cancel(request, "remote-1") is None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
def test_importing_the_provider_loads_no_native_library() -> None:
    code = (
        "import providers.local, sys\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('libespeak' in maps, 'espeakng_loader' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )

    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_a_prompt_with_a_lone_surrogate_still_renders(content_type: str) -> None:
    # JSON allows "\ud800"; UTF-8 does not, and the worker must not crash on it.
    request = make_request(content_type, prompt="A harbour \ud800 at dawn")

    output = LocalProvider().start(request)

    assert output.data
