"""The local provider's speech: real WAV files of the prompt read by eSpeak NG."""

from __future__ import annotations

import io
import wave
from array import array
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.provider import GenerationRequest, Output
from pipeline.provider_errors import RejectedError
from providers.local import LocalProvider

PROMPT = "The lighthouse keeper climbed the stairs every evening at sunset."


def make_request(prompt: str = PROMPT, **audio_settings: object) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1", content_type="audio", prompt=prompt, settings=audio_settings
    )


def read_wav(output: Output) -> tuple[wave._wave_params, array]:
    with wave.open(io.BytesIO(output.data), "rb") as wav:
        params = wav.getparams()
        samples = array("h", wav.readframes(params.nframes))
    return params, samples


def test_speaks_the_prompt_into_a_wav_file() -> None:
    provider = LocalProvider()
    request = make_request()

    output = provider.start(request)

    params, samples = read_wav(output)
    assert output.data[:4] == b"RIFF"
    assert output.data[8:12] == b"WAVE"
    assert (params.nchannels, params.sampwidth) == (1, 2)
    assert params.framerate == output.metadata["sample_rate"] > 8000
    seconds = params.nframes / params.framerate
    assert 2.0 < seconds < 10.0
    assert output.metadata["duration"] == pytest.approx(seconds, abs=0.01)
    assert output.metadata["voice"] == "en"
    # Speech, not silence: loud samples, and plenty of them.
    assert max(abs(sample) for sample in samples) > 3000
    assert sum(1 for sample in samples if abs(sample) > 500) > params.framerate // 2
    assert output.mime_type == "audio/wav"
    assert output.extension == "wav"
    assert output.usage == {"characters": len(PROMPT)}
    assert provider.estimate_usage("audio", PROMPT, request.settings) == output.usage


def test_a_faster_speed_gives_shorter_speech() -> None:
    provider = LocalProvider()

    slow = provider.start(make_request(speed=100))
    fast = provider.start(make_request(speed=400))

    assert fast.metadata["duration"] < slow.metadata["duration"] * 0.6


def test_another_voice_can_be_chosen() -> None:
    output = LocalProvider().start(make_request("Bonjour tout le monde", voice="fr"))

    params, _ = read_wav(output)
    assert params.nframes > 0
    assert output.metadata["voice"] == "fr"


def test_concurrent_jobs_in_one_process_each_get_their_own_speech() -> None:
    provider = LocalProvider()
    prompts = [f"Job {n} says: " + "hello " * n for n in range(1, 7)]
    alone = [provider.start(make_request(prompt)) for prompt in prompts]

    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda prompt: provider.start(make_request(prompt)), prompts))

    # eSpeak NG's output wobbles by a few samples between runs, so compare lengths:
    # speech mixed up between jobs would be far off.
    for shared, single in zip(together, alone, strict=True):
        params, samples = read_wav(shared)
        assert params.nframes / params.framerate == pytest.approx(
            single.metadata["duration"], abs=0.02
        )
        assert max(abs(sample) for sample in samples) > 3000


@pytest.mark.parametrize(
    ("name", "bad_value"),
    [
        ("voice", "no-such-voice"),
        ("voice", ""),
        ("voice", 7),
        ("voice", "x" * 65),
        ("speed", 79),
        ("speed", 451),
        ("speed", "fast"),
    ],
)
def test_invalid_settings_are_rejected_at_estimate_and_start(name: str, bad_value: object) -> None:
    provider = LocalProvider()
    request = make_request(**{name: bad_value})

    with pytest.raises(RejectedError, match=name):
        provider.estimate_usage("audio", PROMPT, request.settings)
    with pytest.raises(RejectedError, match=name):
        provider.start(request)


def test_a_prompt_without_words_is_rejected() -> None:
    provider = LocalProvider()

    with pytest.raises(RejectedError, match="prompt"):
        provider.estimate_usage("audio", "   ", {})
    with pytest.raises(RejectedError, match="prompt"):
        provider.start(make_request("   "))
