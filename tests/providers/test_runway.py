"""RunwayProvider against the fake Runway server over real HTTP."""

from __future__ import annotations

import time

import pytest

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import (
    AuthError,
    ContentFilteredError,
    NotConfiguredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.runway import RunwayProvider
from tests.fakes.base import Reply
from tests.fakes.media import PNG_SIGNATURE
from tests.fakes.runway import FakeRunway

KEY = "key_runway_secret_0123456789abcdef"


@pytest.fixture
def fake():
    with FakeRunway(api_key=KEY) as server:
        yield server


@pytest.fixture
def provider(fake):
    return RunwayProvider(base_url=fake.url, timeout=2)


def job(
    content_type="video", prompt="a drone shot over a glacier", key=KEY, **settings
) -> GenerationRequest:
    return GenerationRequest(
        "job-1", content_type, prompt, settings, {"api_key": key} if key else {}
    )


def run_to_end(provider, request, polls=10) -> Output:
    result = provider.start(request)
    for _ in range(polls):
        if isinstance(result, Output):
            return result
        result = provider.check(request, result.remote_id)
    raise AssertionError(f"still pending after {polls} polls: {result}")


def test_text_to_video_polls_to_completion_and_downloads(provider, fake):
    request = job(duration=8, ratio="720:1280")
    pending = provider.start(request)
    assert isinstance(pending, Pending)
    assert pending.remote_id in fake.tasks
    running = provider.check(request, pending.remote_id)
    assert (running.status, running.progress) == ("RUNNING", 0.5)
    out = provider.check(request, pending.remote_id)
    assert isinstance(out, Output)
    assert out.data[4:8] == b"ftyp"
    assert (out.mime_type, out.extension) == ("video/mp4", "mp4")
    assert out.usage == {"gen4.5_seconds": 8}
    sent = fake.received("submit")[0]
    assert sent.path == "/v1/text_to_video"
    assert sent.json() == {
        "promptText": "a drone shot over a glacier",
        "model": "gen4.5",
        "ratio": "720:1280",
        "duration": 8,
    }


def test_a_prompt_image_goes_to_image_to_video(provider, fake):
    out = run_to_end(provider, job(model="gen4_turbo", promptImage="https://example.com/a.png"))
    assert out.usage == {"gen4_turbo_seconds": 5}
    assert fake.received("submit")[0].path == "/v1/image_to_video"


def test_text_to_image_returns_the_png(provider, fake):
    out = run_to_end(provider, job("image", ratio="1920:1080"))
    assert out.data.startswith(PNG_SIGNATURE)
    assert (out.mime_type, out.extension) == ("image/png", "png")
    assert out.usage == {"gen4_image_1080p_images": 1}
    assert fake.received("submit")[0].path == "/v1/text_to_image"


def test_throttled_tasks_stay_pending_until_a_slot_frees(provider, fake):
    fake.config["throttled"] = True
    request = job()
    pending = provider.start(request)
    assert provider.check(request, pending.remote_id).status == "THROTTLED"
    fake.config["throttled"] = False
    assert provider.check(request, pending.remote_id).status == "RUNNING"
    assert isinstance(provider.check(request, pending.remote_id), Output)


def test_the_version_header_is_sent(provider, fake):
    provider.start(job())
    assert fake.received("submit")[0].headers["x-runway-version"] == "2024-11-06"
    wrong = RunwayProvider(base_url=fake.url, timeout=2, api_version="2023-01-01")
    with pytest.raises(RejectedError, match="X-Runway-Version"):
        wrong.start(job())


@pytest.mark.parametrize(
    ("code", "error"),
    [("SAFETY.INPUT.TEXT", ContentFilteredError), ("INTERNAL.BAD_OUTPUT", RejectedError)],
)
def test_failed_tasks_are_rejections(provider, fake, code, error):
    fake.config.update(outcome="FAILED", failure_code=code)
    with pytest.raises(error, match="task failed") as raised:
        run_to_end(provider, job())
    assert type(raised.value) is error


@pytest.mark.parametrize("spelling", ["CANCELLED", "CANCELED"])
def test_cancel_deletes_the_task_and_either_spelling_ends_it(provider, fake, spelling):
    fake.config.update(cancel_spelling=spelling, polls_to_finish=5)
    request = job()
    pending = provider.start(request)
    provider.cancel(request, pending.remote_id)
    assert fake.tasks[pending.remote_id]["status"] == spelling
    assert [r.method for r in fake.received("delete")] == ["DELETE"]
    with pytest.raises(RejectedError, match="cancelled"):
        provider.check(request, pending.remote_id)


def test_cancelling_a_deleted_task_is_quiet(provider):
    provider.cancel(job(), "00000000-0000-4000-8000-000000000000")


def test_an_expired_download_url_is_transient(provider, fake):
    request = job()
    pending = provider.start(request)
    provider.check(request, pending.remote_id)
    fake.push("download", Reply(403, "<Error><Code>AccessDenied</Code></Error>"))
    with pytest.raises(TransientError, match="download"):
        provider.check(request, pending.remote_id)
    assert isinstance(provider.check(request, pending.remote_id), Output)  # a fresh URL works


def test_downloads_never_carry_our_key(provider, fake):
    run_to_end(provider, job())
    assert "authorization" not in fake.received("download")[0].headers


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (("daily_limit",), QuotaExhaustedError),
        (("out_of_credits",), QuotaExhaustedError),
        (("error", 400, "promptText is too long"), RejectedError),
        (("error", 422, "Unprocessable"), RejectedError),
        (("error", 401, "Unauthorized"), AuthError),
        (("error", 403, "Forbidden"), AuthError),
        (("error", 502, "Bad gateway"), TransientError),
        (("error", 503, "Unavailable"), TransientError),
        (("error", 500, "Internal"), TransientError),
    ],
)
def test_errors_map_onto_our_tree(provider, fake, behaviour, error):
    name, *args = behaviour
    fake.push("submit", getattr(fake, name)(*args))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


def test_poll_errors_map_too(provider, fake):
    pending = provider.start(job())
    fake.push("task", fake.error(503, "down", {"Retry-After": "4"}))
    with pytest.raises(TransientError) as raised:
        provider.check(job(), pending.remote_id)
    assert raised.value.retry_after == 4.0


def test_a_slow_server_is_a_transient_timeout(fake):
    fake.push("submit", fake.slow(2.0))
    started = time.monotonic()
    with pytest.raises(TransientError, match="within"):
        RunwayProvider(base_url=fake.url, timeout=0.3).start(job())
    assert time.monotonic() - started < 1.5


def test_missing_key_is_not_configured(provider):
    with pytest.raises(NotConfiguredError):
        provider.start(job(key=None))


@pytest.mark.parametrize(
    ("content_type", "settings", "name"),
    [
        ("video", {"model": "gen3a_turbo"}, "model"),
        ("video", {"duration": 11}, "duration"),
        ("video", {"model": "veo3.1", "duration": 5}, "duration"),
        ("video", {"ratio": "1584:672"}, "ratio"),  # an image_to_video-only ratio
        ("video", {"model": "gen4_turbo"}, "promptImage"),
        ("video", {"seed": -1}, "seed"),
        ("image", {"model": "gen4_image_turbo"}, "referenceImages"),
        ("image", {"referenceImages": "x"}, "referenceImages"),
        ("image", {"ratio": "1:1"}, "ratio"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(provider, content_type, settings, name):
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage(content_type, "prompt", settings)


def test_estimates_are_the_billed_units(provider):
    assert provider.estimate_usage("video", "p", {"model": "veo3.1_fast", "duration": 6}) == {
        "veo3.1_fast_seconds": 6
    }
    assert provider.estimate_usage("image", "p", {"ratio": "1280:720"}) == {
        "gen4_image_720p_images": 1
    }
    with pytest.raises(RejectedError, match="1000"):
        provider.estimate_usage("video", "x" * 1001, {})


def test_the_key_never_appears_in_errors_or_reprs(fake):
    provider = RunwayProvider(base_url=fake.url, timeout=0.3)
    wrong = "key_runway_wrong_secret_987654"
    cases = [
        (None, job(key=wrong)),  # the fake echoes the bad key back
        (Reply(500, {"error": f"bad token {KEY}"}), job()),
        (fake.slow(1.0), job()),
        (fake.out_of_credits(), job()),
    ]
    for behaviour, request in cases:
        if behaviour is not None:
            fake.push("submit", behaviour)
        with pytest.raises(ProviderError) as raised:
            provider.start(request)
        for secret in (KEY, wrong):
            assert secret not in str(raised.value) + repr(raised.value)
    out = run_to_end(provider, job())
    assert KEY not in repr(out) + str(out.metadata) + repr(provider)
