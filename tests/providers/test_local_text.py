"""The local provider's development text: deterministic, labelled, within its token budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.provider import GenerationRequest
from pipeline.provider_errors import RejectedError
from providers.local import LocalProvider

PROMPT = "Write a short note about lighthouses and the people who kept them"


def make_request(prompt: str = PROMPT, **text_settings: object) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1", content_type="text", prompt=prompt, settings=text_settings
    )


def test_same_prompt_and_settings_give_the_same_bytes() -> None:
    provider = LocalProvider()

    first = provider.start(make_request(maxTokens=120))
    second = provider.start(make_request(maxTokens=120))
    other = provider.start(make_request("Something else entirely", maxTokens=120))

    assert first.data == second.data
    assert first.data != other.data


def test_output_is_utf8_text_labelled_as_development() -> None:
    output = LocalProvider().start(make_request("Écris un poème sur la mer"))

    text = output.data.decode("utf-8")
    assert "mer" in text
    assert output.mime_type == "text/plain; charset=utf-8"
    assert output.extension == "txt"
    assert output.metadata["model"] == "local-dev-text"
    assert output.metadata["development"] is True


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 50, 256, 4000])
def test_usage_counts_the_words_and_stays_within_max_tokens(max_tokens: int) -> None:
    provider = LocalProvider()
    request = make_request(PROMPT * 3, maxTokens=max_tokens)

    output = provider.start(request)
    estimate = provider.estimate_usage("text", request.prompt, request.settings)

    words = output.data.decode("utf-8").split()
    assert output.usage == {"tokens": len(words)}
    assert 1 <= len(words) <= max_tokens
    assert estimate == {"tokens": max_tokens}


def test_a_small_budget_cuts_the_text_and_says_so() -> None:
    provider = LocalProvider()

    full = provider.start(make_request())
    cut = provider.start(make_request(maxTokens=10))

    assert full.metadata["finish_reason"] == "stop"
    assert cut.metadata["finish_reason"] == "length"
    assert full.data.decode().split()[:10] == cut.data.decode().split()


def test_default_budget_is_256_tokens() -> None:
    assert LocalProvider().estimate_usage("text", PROMPT, {}) == {"tokens": 256}


@given(prompt=st.text(max_size=300), max_tokens=st.integers(min_value=1, max_value=4000))
@settings(max_examples=60, deadline=None)
def test_any_prompt_stays_within_its_estimate(prompt: str, max_tokens: int) -> None:
    provider = LocalProvider()
    request = make_request(prompt, maxTokens=max_tokens)

    output = provider.start(request)

    assert output.usage["tokens"] == len(output.data.decode("utf-8").split())
    assert (
        output.usage["tokens"]
        <= provider.estimate_usage("text", prompt, request.settings)["tokens"]
    )


@pytest.mark.parametrize("bad_value", [0, -5, 4001, "256", 12.5, True, [256]])
def test_invalid_max_tokens_is_rejected_at_estimate_and_start(bad_value: object) -> None:
    provider = LocalProvider()
    request = make_request(maxTokens=bad_value)

    with pytest.raises(RejectedError, match="maxTokens"):
        provider.estimate_usage("text", PROMPT, request.settings)
    with pytest.raises(RejectedError, match="maxTokens"):
        provider.start(request)


def test_whole_float_max_tokens_and_unknown_settings_are_accepted() -> None:
    output = LocalProvider().start(make_request(maxTokens=20.0, temperature=0.7))

    assert output.usage["tokens"] <= 20
