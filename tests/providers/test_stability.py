"""StabilityProvider against the fake Stability server over real HTTP."""

from __future__ import annotations

import base64
import time

import pytest

from pipeline.provider import GenerationRequest
from pipeline.provider_errors import (
    AuthError,
    ContentFilteredError,
    NotConfiguredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.stability import ERROR_NAMES, StabilityProvider
from tests.fakes.base import Reply
from tests.fakes.media import PNG_SIGNATURE, png_bytes
from tests.fakes.stability import FakeStability

KEY = "sk-stability-secret-0123456789"


@pytest.fixture
def fake():
    with FakeStability(api_key=KEY) as server:
        yield server


@pytest.fixture
def provider(fake):
    return StabilityProvider(base_url=fake.url, timeout=2)


def job(prompt="a lighthouse at dusk", key=KEY, **settings) -> GenerationRequest:
    return GenerationRequest("job-1", "image", prompt, settings, {"api_key": key} if key else {})


def test_core_image_comes_back_as_png_bytes(provider, fake):
    out = provider.start(job(aspectRatio="16:9", seed=7))
    assert out.data.startswith(PNG_SIGNATURE)
    assert (out.mime_type, out.extension) == ("image/png", "png")
    assert out.usage == {"core_images": 1}
    assert out.metadata["seed"] == "7"
    form = fake.received("generate")[0].form()
    assert (form["prompt"], form["aspect_ratio"]) == ("a lighthouse at dusk", "16:9")


def test_sd3_models_go_to_the_sd3_endpoint_with_their_model_field(provider, fake):
    out = provider.start(job(model="sd3.5-medium", outputFormat="jpeg", negativePrompt="blur"))
    assert out.usage == {"sd3.5-medium_images": 1}
    assert out.extension == "jpg"
    request = fake.received("generate")[0]
    assert request.path.endswith("/sd3")
    assert request.form()["model"] == "sd3.5-medium"


def test_a_json_answer_is_decoded_too(provider, fake):
    image = png_bytes(4, 4)
    fake.push(
        "generate",
        Reply(
            200, {"image": base64.b64encode(image).decode(), "finish_reason": "SUCCESS", "seed": 3}
        ),
    )
    assert provider.start(job()).data == image


@pytest.mark.parametrize("scenario", ["filtered", "moderated"])
def test_content_filtering_is_content_filtered(provider, fake, scenario):
    fake.push("generate", getattr(fake, scenario)())
    with pytest.raises(ContentFilteredError):
        provider.start(job())


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        (("rate_limited",), TransientError),
        (("error", 500, "internal_error"), TransientError),
        (("error", 502, "bad_gateway"), TransientError),
        (("error", 400, "bad_request", "prompt: is required"), RejectedError),
        (("error", 422, "invalid_language"), RejectedError),
        (("error", 401, "unauthorized"), AuthError),
        (("quota_exhausted",), QuotaExhaustedError),
    ],
)
def test_errors_map_onto_our_tree(provider, fake, scenario, error):
    name, *args = scenario
    fake.push("generate", getattr(fake, name)(*args))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


@pytest.mark.parametrize(("code", "error"), ERROR_NAMES.items())
def test_every_code_in_the_vendor_table_wins_over_the_status(provider, fake, code, error):
    fake.push("generate", fake.error(400, code))
    with pytest.raises(error) as raised:
        provider.start(job())
    assert type(raised.value) is error


def test_the_error_message_is_the_vendors(provider, fake):
    fake.push("generate", fake.error(400, "bad_request", "aspect_ratio: invalid"))
    with pytest.raises(RejectedError, match="aspect_ratio: invalid"):
        provider.start(job())


@pytest.mark.parametrize(
    ("headers", "wait"),
    [({}, 60.0), ({"retry-after": "12"}, 12.0), ({"retry-after-ms": "800"}, 0.8)],
)
def test_rate_limit_waits_out_the_lockout_unless_told_otherwise(provider, fake, headers, wait):
    fake.push("generate", fake.rate_limited(headers))
    with pytest.raises(TransientError) as raised:
        provider.start(job())
    assert raised.value.retry_after == wait


def test_a_slow_server_is_a_transient_timeout(fake):
    fake.push("generate", fake.slow(2.0))
    started = time.monotonic()
    with pytest.raises(TransientError, match="within"):
        StabilityProvider(base_url=fake.url, timeout=0.3).start(job())
    assert time.monotonic() - started < 1.5


def test_missing_key_is_not_configured(provider):
    with pytest.raises(NotConfiguredError):
        provider.start(job(key=None))


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"model": "sdxl"}, "model"),
        ({"aspectRatio": "3:1"}, "aspectRatio"),
        ({"seed": -1}, "seed"),
        ({"stylePreset": "oil"}, "stylePreset"),
        ({"model": "sd3.5-large", "outputFormat": "webp"}, "outputFormat"),
        ({"model": "sd3.5-large-turbo", "negativePrompt": "x"}, "negativePrompt"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_setting(provider, settings, name):
    with pytest.raises(RejectedError, match=f"'{name}'"):
        provider.estimate_usage("image", "prompt", settings)


def test_estimate_is_one_image_of_the_chosen_model(provider):
    assert provider.estimate_usage("image", "p", {"model": "ultra"}) == {"ultra_images": 1}
    with pytest.raises(RejectedError):
        provider.estimate_usage("video", "p", {})


def test_the_key_never_appears_in_errors_or_reprs(fake):
    provider = StabilityProvider(base_url=fake.url, timeout=0.3)
    wrong = "sk-stability-wrong-secret-key"
    cases = [
        (None, job(key=wrong)),  # the fake echoes the bad key back
        (Reply(500, {"name": "internal_error", "errors": [f"bad {KEY}"]}), job()),
        (fake.slow(1.0), job()),
        (fake.quota_exhausted(), job()),
    ]
    for behaviour, request in cases:
        if behaviour is not None:
            fake.push("generate", behaviour)
        with pytest.raises(ProviderError) as raised:
            provider.start(request)
        for secret in (KEY, wrong):
            assert secret not in str(raised.value) + repr(raised.value)
    out = provider.start(job())
    assert KEY not in repr(out) + str(out.metadata) + repr(provider)
