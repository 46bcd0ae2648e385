"""HeyGenProvider against the fake HeyGen server over real HTTP."""

from __future__ import annotations

import time

import pytest

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import (
    AuthError,
    NotConfiguredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.heygen import HeyGenProvider
from tests.fakes.base import Reply
from tests.fakes.heygen import FakeHeyGen

KEY = "heygen-secret-key-0123456789"
SCRIPT = " ".join(["word"] * 100)  # 100 words: 40 s at the fake's pace, ~50 s in the estimate


@pytest.fixture
def fake():
    with FakeHeyGen(api_key=KEY) as server:
        yield server


@pytest.fixture
def provider(fake):
    return HeyGenProvider(base_url=fake.url, timeout=2)


def job(prompt=SCRIPT, key=KEY, **settings) -> GenerationRequest:
    return GenerationRequest("job-42", "video", prompt, settings, {"api_key": key} if key else {})


def run_to_end(provider, request, polls=10) -> Output:
    result = provider.start(request)
    for _ in range(polls):
        if isinstance(result, Output):
            return result
        result = provider.check(request, result.remote_id)
    raise AssertionError(f"still pending after {polls} polls: {result}")


def test_video_goes_through_heygens_states_then_downloads(provider, fake):
    request = job(avatarId="Anna_public_3", voiceId="v1", width=720, height=1280)
    pending = provider.start(request)
    assert isinstance(pending, Pending)
    assert fake.videos[pending.remote_id]["callback_id"] == "job-42"
    assert provider.check(request, pending.remote_id).status == "waiting"
    assert provider.check(request, pending.remote_id).status == "processing"
    out = provider.check(request, pending.remote_id)
    assert isinstance(out, Output)
    assert out.data[4:8] == b"ftyp"
    assert out.usage == {"avatar_half_minutes": 2}  # 40 s of video, billed per started 30 s
    assert out.metadata["duration"] == 40.0
    sent = fake.received("generate")[0].json()
    assert sent["dimension"] == {"width": 720, "height": 1280}
    scene = sent["video_inputs"][0]
    assert scene["character"]["avatar_id"] == "Anna_public_3"
    assert scene["voice"] == {"type": "text", "voice_id": "v1", "input_text": SCRIPT, "speed": 1.0}


def test_talking_photos_use_their_own_unit(provider):
    out = run_to_end(provider, job(prompt="short script", avatarType="talking_photo"))
    assert out.usage == {"photo_avatar_half_minutes": 1}
    assert provider.estimate_usage("video", SCRIPT, {"avatarType": "talking_photo"}) == {
        "photo_avatar_half_minutes": 2
    }


@pytest.mark.parametrize(
    "failure",
    ["Video duration exceeds limit", {"code": "40012", "message": "Video duration exceeds limit"}],
)
def test_a_failed_video_is_rejected_with_heygens_reason(provider, fake, failure):
    fake.config.update(outcome="failed", failure=failure)
    with pytest.raises(RejectedError, match="exceeds limit"):
        run_to_end(provider, job())


def test_a_video_url_that_is_not_ready_yet_is_transient(provider, fake):
    fake.config["polls_to_finish"] = 1
    request = job()
    pending = provider.start(request)
    fake.push("download", Reply(404, "Not Found"))
    with pytest.raises(TransientError, match="download"):
        provider.check(request, pending.remote_id)
    assert isinstance(provider.check(request, pending.remote_id), Output)


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (("out_of_credits",), QuotaExhaustedError),
        (("error", 400, "invalid_parameter", "input_text too long"), RejectedError),
        (("error", 424, "invalid_parameter"), RejectedError),
        (("error", 401, "unauthorized"), AuthError),
        (("error", 429, "rate_limit"), TransientError),
        (("error", 500, "internal_error"), TransientError),
        (("error", 504, "timeout"), TransientError),
    ],
)
def test_errors_map_onto_our_tree(provider, fake, behaviour, error):
    name, *args = behaviour
    fake.push("generate", getattr(fake, name)(*args))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


def test_an_unknown_video_is_rejected(provider):
    with pytest.raises(RejectedError, match="Video not found"):
        provider.check(job(), "nope")


def test_rate_limit_carries_retry_after_when_sent(provider, fake):
    fake.push("status", fake.error(429, "rate_limit", "slow down", {"Retry-After": "30"}))
    with pytest.raises(TransientError) as raised:
        provider.check(job(), "any")
    assert raised.value.retry_after == 30.0


def test_a_slow_server_is_a_transient_timeout(fake):
    fake.push("generate", fake.slow(2.0))
    started = time.monotonic()
    with pytest.raises(TransientError, match="within"):
        HeyGenProvider(base_url=fake.url, timeout=0.3).start(job())
    assert time.monotonic() - started < 1.5


def test_missing_key_is_not_configured(provider):
    with pytest.raises(NotConfiguredError):
        provider.start(job(key=None))


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"avatarType": "hologram"}, "avatarType"),
        ({"avatarStyle": "tiny"}, "avatarStyle"),
        ({"width": 100}, "width"),
        ({"speed": 3}, "speed"),
        ({"backgroundColor": "red"}, "backgroundColor"),
        ({"caption": "yes"}, "caption"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(provider, settings, name):
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage("video", "hello", settings)


def test_estimate_counts_half_minutes_of_speech(provider):
    assert provider.estimate_usage("video", "hi", {}) == {"avatar_half_minutes": 1}
    assert provider.estimate_usage("video", SCRIPT, {"speed": 0.5}) == {"avatar_half_minutes": 4}
    with pytest.raises(RejectedError, match="4999"):
        provider.estimate_usage("video", "x" * 5000, {})


def test_the_key_never_appears_in_errors_or_reprs(fake):
    provider = HeyGenProvider(base_url=fake.url, timeout=0.3)
    wrong = "heygen-wrong-secret-key-5555"
    cases = [
        (None, job(key=wrong)),  # the fake echoes the bad key back
        (Reply(500, {"error": {"code": "x", "message": KEY}, "data": None}), job()),
        (fake.slow(1.0), job()),
        (fake.out_of_credits(), job()),
    ]
    for behaviour, request in cases:
        if behaviour is not None:
            fake.push("generate", behaviour)
        with pytest.raises(ProviderError) as raised:
            provider.start(request)
        for secret in (KEY, wrong):
            assert secret not in str(raised.value) + repr(raised.value)
    out = run_to_end(provider, job())
    assert KEY not in repr(out) + str(out.metadata) + repr(provider)
