"""ElevenLabsProvider against the fake ElevenLabs server over real HTTP."""

from __future__ import annotations

import time

import pytest

from pipeline.provider import GenerationRequest
from pipeline.provider_errors import (
    AuthError,
    NotConfiguredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.elevenlabs import ERROR_CODES, ElevenLabsProvider
from tests.fakes.base import Reply
from tests.fakes.elevenlabs import FakeElevenLabs

KEY = "xi-secret-0123456789abcdef"


@pytest.fixture
def fake():
    with FakeElevenLabs(api_key=KEY) as server:
        yield server


@pytest.fixture
def provider(fake):
    return ElevenLabsProvider(base_url=fake.url, timeout=2)


def job(prompt="Hello from the pipeline", key=KEY, **settings) -> GenerationRequest:
    return GenerationRequest("job-1", "audio", prompt, settings, {"api_key": key} if key else {})


def test_speech_is_billed_by_the_character_cost_header(provider, fake):
    out = provider.start(job(modelId="eleven_flash_v2_5", outputFormat="mp3_22050_32"))
    assert out.data.startswith(b"ID3")
    assert (out.mime_type, out.extension) == ("audio/mpeg", "mp3")
    assert out.usage == {"characters": 12}  # 23 characters at half a credit each, rounded up
    assert out.metadata["request_id"]
    sent = fake.received("tts")[0]
    assert sent.params["voice"] == "JBFqnCBsd6RMkjVDRZzb"
    assert sent.query == {"output_format": "mp3_22050_32"}
    assert sent.json()["model_id"] == "eleven_flash_v2_5"


def test_voice_and_voice_settings_reach_the_api(provider, fake):
    provider.start(job(voiceId="21m00Tcm4TlvDq8ikWAM", stability=0.4, speed=1.1, seed=5))
    sent = fake.received("tts")[0]
    assert sent.params["voice"] == "21m00Tcm4TlvDq8ikWAM"
    assert sent.json()["voice_settings"] == {"stability": 0.4, "speed": 1.1}
    assert sent.json()["seed"] == 5


def test_output_format_decides_the_file_type(provider):
    out = provider.start(job(outputFormat="pcm_16000"))
    assert (out.mime_type, out.extension) == ("audio/pcm", "pcm")


def test_without_the_header_the_estimate_is_billed(provider, fake):
    fake.push("tts", Reply(200, b"ID3audio", {"Content-Type": "audio/mpeg"}))
    assert provider.start(job(prompt="abcd")).usage == {"characters": 4}


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (("quota_exceeded",), QuotaExhaustedError),
        (("error", 401, "invalid_api_key", "Invalid API key"), AuthError),
        (("busy",), TransientError),
        (("error", 429, "system_busy"), TransientError),
        (("error", 500, "internal_error"), TransientError),
        (("error", 503, "service_unavailable"), TransientError),
        (("error", 400, "invalid_model"), RejectedError),
        (("error", 404, "voice_not_found"), RejectedError),
    ],
)
def test_errors_map_onto_our_tree(provider, fake, behaviour, error):
    name, *args = behaviour
    fake.push("tts", getattr(fake, name)(*args))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


@pytest.mark.parametrize(("code", "error"), ERROR_CODES.items())
def test_every_code_in_the_vendor_table_wins_over_the_status(provider, fake, code, error):
    fake.push("tts", fake.error(400, code))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


def test_an_unknown_voice_is_rejected_with_the_vendors_words(provider):
    with pytest.raises(RejectedError, match="was not found"):
        provider.start(job(voiceId="nobody"))


def test_a_bare_unauthenticated_detail_is_an_auth_error(provider, fake):
    fake.push("tts", Reply(401, {"detail": "Unauthenticated"}))
    with pytest.raises(AuthError, match="Unauthenticated"):
        provider.start(job())


@pytest.mark.parametrize("key", [None, "", "   ", "bad\nkey"])
def test_a_missing_or_malformed_key_is_not_configured(provider, key):
    with pytest.raises(NotConfiguredError):
        provider.start(job(key=key))


def test_validation_errors_are_readable(provider, fake):
    fake.push(
        "tts",
        Reply(
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "text"],
                        "msg": "field required",
                        "type": "value_error.missing",
                    }
                ]
            },
        ),
    )
    with pytest.raises(RejectedError, match=r"body\.text: field required"):
        provider.start(job())


@pytest.mark.parametrize(("headers", "wait"), [({"retry-after": "3"}, 3.0), ({}, None)])
def test_busy_carries_retry_after_when_sent(provider, fake, headers, wait):
    fake.push("tts", fake.busy(headers))
    with pytest.raises(TransientError) as raised:
        provider.start(job())
    assert raised.value.retry_after == wait


def test_a_slow_server_is_a_transient_timeout(fake):
    fake.push("tts", fake.slow(2.0))
    started = time.monotonic()
    with pytest.raises(TransientError, match="within"):
        ElevenLabsProvider(base_url=fake.url, timeout=0.3).start(job())
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"modelId": "eleven_nonexistent"}, "modelId"),
        ({"outputFormat": "mp3_1_1"}, "outputFormat"),
        ({"stability": 2}, "stability"),
        ({"seed": "x"}, "seed"),
        ({"voiceId": 12}, "voiceId"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(provider, settings, name):
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage("audio", "hello", settings)


def test_estimate_applies_the_model_multiplier(provider):
    assert provider.estimate_usage("audio", "x" * 101, {}) == {"characters": 101}
    flash = provider.estimate_usage("audio", "x" * 101, {"modelId": "eleven_turbo_v2_5"})
    assert flash == {"characters": 51}


def test_the_key_never_appears_in_errors_or_reprs(fake):
    provider = ElevenLabsProvider(base_url=fake.url, timeout=0.3)
    wrong = "xi-wrong-secret-key-9876543210"
    cases = [
        (None, job(key=wrong)),  # the fake echoes the bad key back
        (fake.quota_exceeded(), job()),
        (Reply(500, {"detail": {"status": "internal_error", "message": KEY}}), job()),
        (fake.slow(1.0), job()),
    ]
    for behaviour, request in cases:
        if behaviour is not None:
            fake.push("tts", behaviour)
        with pytest.raises(ProviderError) as raised:
            provider.start(request)
        for secret in (KEY, wrong):
            assert secret not in str(raised.value) + repr(raised.value)
    out = provider.start(job())
    assert KEY not in repr(out) + str(out.metadata) + repr(provider)
