"""OpenAIProvider against the fake OpenAI server over real HTTP."""

from __future__ import annotations

import time
from email.utils import formatdate

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
from providers.openai import ERROR_CODES, OpenAIProvider
from tests.fakes.base import Reply
from tests.fakes.media import PNG_SIGNATURE
from tests.fakes.openai import FakeOpenAI

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def fake():
    with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
def provider(fake):
    return OpenAIProvider(base_url=f"{fake.url}/v1", timeout=2)


def job(content_type="text", prompt="Write a haiku", key=KEY, **settings) -> GenerationRequest:
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


def test_text_returns_the_completion_and_its_token_usage(provider):
    out = provider.start(job(prompt="hello there"))
    assert out.data == b"Echo: hello there"
    assert out.mime_type == "text/plain"
    assert out.usage == {"input_tokens": 4 + len("hello there") // 4, "output_tokens": 3}
    assert out.metadata["request_id"].startswith("req_")


def test_text_stops_at_max_tokens(provider, fake):
    fake.config["reply"] = "one two three four five six"
    out = provider.start(job(maxTokens=2))
    assert out.data == b"one two"
    assert out.usage["output_tokens"] == 2
    assert out.metadata["finish_reason"] == "length"


def test_image_decodes_base64_png_and_reports_image_tokens(provider):
    out = provider.start(job("image", quality="medium", size="1024x1536"))
    assert out.data.startswith(PNG_SIGNATURE)
    assert (out.mime_type, out.extension) == ("image/png", "png")
    assert out.usage["output_tokens"] == 1584


def test_speech_is_binary_and_billed_per_character(provider):
    out = provider.start(job("audio", prompt="Hello, world", voice="nova"))
    assert out.data.startswith(b"ID3")
    assert out.mime_type == "audio/mpeg"
    assert out.usage == {"characters": 12}
    hd = provider.start(job("audio", prompt="Hello", model="tts-1-hd", format="wav"))
    assert (hd.usage, hd.mime_type, hd.extension) == ({"hd_characters": 5}, "audio/wav", "wav")


def test_video_polls_until_completed_then_downloads(provider, fake):
    request = job("video", prompt="a fox", seconds="8", size="1280x720")
    first = provider.start(request)
    assert isinstance(first, Pending)
    assert first.remote_id.startswith("video_")
    middle = provider.check(request, first.remote_id)
    assert isinstance(middle, Pending)
    assert (middle.status, middle.progress) == ("in_progress", 0.5)
    out = provider.check(request, first.remote_id)
    assert isinstance(out, Output)
    assert out.data[4:8] == b"ftyp"
    assert out.usage == {"seconds": 8}


def test_pro_video_on_the_tall_size_uses_the_pro_hd_unit(provider):
    out = run_to_end(provider, job("video", model="sora-2-pro", size="1024x1792"))
    assert out.usage == {"pro_hd_seconds": 4}


@pytest.mark.parametrize(
    ("code", "error"),
    [("internal_error", RejectedError), ("moderation_blocked", ContentFilteredError)],
)
def test_failed_video_is_a_rejection(provider, fake, code, error):
    fake.config.update(video_outcome="failed", video_error_code=code)
    with pytest.raises(error, match="video failed"):
        run_to_end(provider, job("video"))


def test_cancel_deletes_the_video_and_tolerates_it_being_gone(provider, fake):
    request = job("video")
    pending = provider.start(request)
    provider.cancel(request, pending.remote_id)
    assert pending.remote_id not in fake.videos
    provider.cancel(request, pending.remote_id)  # already gone: not an error


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        (("rate_limited",), TransientError),
        (("error", 500, "server_error", "boom", "server_error"), TransientError),
        (("error", 503, "server_is_overloaded"), TransientError),
        (("error", 400, None, "Invalid value for 'model'"), RejectedError),
        (("error", 422), RejectedError),
        (("error", 401, "invalid_api_key"), AuthError),
        (("error", 403, "unsupported_country_region_territory"), AuthError),
        (("quota_exhausted",), QuotaExhaustedError),
        (("error", 400, "content_policy_violation"), ContentFilteredError),
    ],
)
def test_errors_map_onto_our_tree(provider, fake, scenario, error):
    name, *args = scenario
    fake.push("chat", getattr(fake, name)(*args))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert raised.value.provider == "openai"
    assert type(raised.value) is error


@pytest.mark.parametrize(("code", "error"), ERROR_CODES.items())
def test_every_code_in_the_vendor_table_wins_over_the_status(provider, fake, code, error):
    fake.push("chat", fake.error(400, code))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


def test_insufficient_quota_is_not_retryable_although_it_is_a_429(provider, fake):
    fake.push("images", fake.quota_exhausted())
    with pytest.raises(QuotaExhaustedError) as raised:
        provider.start(job("image"))
    assert raised.value.status == 429
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the SDK prefers the ms form
        ({}, None),
    ],
)
def test_rate_limit_carries_retry_after(provider, fake, headers, wait):
    fake.push("chat", fake.rate_limited(headers))
    with pytest.raises(TransientError) as raised:
        provider.start(job())
    assert raised.value.retry_after == wait


def test_retry_after_as_an_http_date(provider, fake):
    fake.push("chat", fake.rate_limited({"retry-after": formatdate(time.time() + 30, usegmt=True)}))
    with pytest.raises(TransientError) as raised:
        provider.start(job())
    assert 25 <= raised.value.retry_after <= 31


def test_a_slow_server_is_a_transient_timeout(fake):
    fake.push("chat", fake.slow(2.0))
    provider = OpenAIProvider(base_url=f"{fake.url}/v1", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TransientError, match=r"within 0\.3s"):
        provider.start(job())
    assert time.monotonic() - started < 1.5


def test_a_refused_connection_is_transient(fake):
    provider = OpenAIProvider(base_url=f"{fake.url}/v1", timeout=1)
    fake.stop()
    with pytest.raises(TransientError, match="ConnectionError"):
        provider.start(job())


def test_chat_content_filter_is_content_filtered(provider, fake):
    fake.push("chat", fake.filtered_chat())
    with pytest.raises(ContentFilteredError):
        provider.start(job())


def test_missing_key_is_not_configured(provider):
    with pytest.raises(NotConfiguredError):
        provider.start(job(key=None))


@pytest.mark.parametrize(
    ("content_type", "settings", "name"),
    [
        ("text", {"maxTokens": 0}, "maxTokens"),
        ("text", {"temperature": 3}, "temperature"),
        ("image", {"size": "10x10"}, "size"),
        ("image", {"model": "dall-e-3"}, "model"),
        ("audio", {"voice": "robot"}, "voice"),
        ("audio", {"model": "gpt-4o-mini-tts"}, "model"),
        ("video", {"seconds": "5"}, "seconds"),
        ("video", {"model": "sora-2", "size": "1792x1024"}, "size"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(provider, content_type, settings, name):
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage(content_type, "prompt", settings)


def test_estimates_bound_the_request():
    provider = OpenAIProvider(base_url="http://unused")
    text = provider.estimate_usage("text", "x" * 300, {"maxTokens": 50})
    assert text == {"input_tokens": 100 + 16, "output_tokens": 50}
    assert provider.estimate_usage("image", "x", {"quality": "high", "size": "auto"}) == {
        "input_tokens": 17,
        "output_tokens": 6240,
    }
    assert provider.estimate_usage("video", "x", {"model": "sora-2-pro", "seconds": "12"}) == {
        "pro_seconds": 12
    }
    with pytest.raises(RejectedError, match="4096"):
        provider.estimate_usage("audio", "x" * 4097, {})


def test_the_key_never_appears_in_errors_or_reprs(fake):
    provider = OpenAIProvider(base_url=f"{fake.url}/v1", timeout=0.3)
    wrong = "sk-wrong-key-that-must-stay-secret"
    raised: list[ProviderError] = []
    for prepare, request in [
        (lambda: None, job(key=wrong)),  # the fake echoes the bad key in its 401 message
        (lambda: fake.push("chat", fake.rate_limited()), job()),
        (lambda: fake.push("chat", Reply(500, f"upstream saw {KEY}")), job()),
        (lambda: fake.push("chat", fake.slow(1.0)), job()),
    ]:
        prepare()
        with pytest.raises(ProviderError) as info:
            provider.start(request)
        raised.append(info.value)
    for exc in raised:
        for secret in (KEY, wrong):
            assert secret not in str(exc)
            assert secret not in repr(exc)
            assert secret not in exc.message
    assert KEY not in repr(job()) + repr(provider)
    out = provider.start(job())
    assert KEY not in repr(out) + str(out.metadata)
