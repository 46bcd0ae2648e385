"""Development speech: the prompt read aloud by eSpeak NG, returned as a WAV file."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from typing import Any

from pipeline.provider import Output
from providers.local import espeak
from providers.local.settings import int_setting, reject, str_setting

MODEL = "local-dev-speech"
DEFAULT_VOICE = "en"
SYNTHESIS_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class AudioSettings:
    """The speech settings the local provider understands."""

    voice: str
    speed: int  # words per minute


def parse_settings(settings: dict[str, Any]) -> AudioSettings:
    """Validate the speech settings; raises RejectedError naming the bad one.

    Checking the voice loads eSpeak NG (a few milliseconds, once per process).
    """
    asked = str_setting(settings, "voice", default=DEFAULT_VOICE, max_length=64)
    voice = next((name for name in _candidates(asked) if espeak.has_voice(name)), None)
    if voice is None:
        raise reject(f'voice {asked!r} is not an eSpeak NG voice or a locale it speaks '
                     '(try "en", "fr" or "en-US")')
    return AudioSettings(voice=voice,
                         speed=int_setting(settings, "speed", default=175, low=80, high=450))


def _candidates(voice: str) -> list[str]:
    """The voice as named, then its locale and language: a cloud voice name such as
    Google's "en-US-Neural2-D" (seed 002's example) is read as eSpeak's "en-us", then "en"."""
    parts = voice.split("-")
    return [voice, "-".join(parts[:2]).lower(), parts[0].lower()]


def estimate_usage(prompt: str, settings: dict[str, Any]) -> dict[str, float]:
    """Characters of the prompt are known up front, so the estimate is exact."""
    parse_settings(settings)
    _require_words(prompt)
    return {"characters": len(prompt)}


def render(prompt: str, settings: dict[str, Any]) -> Output:
    """Read the prompt aloud and wrap the samples in a WAV file."""
    parsed = parse_settings(settings)
    _require_words(prompt)
    speech = synthesize(prompt, parsed)
    if not speech.samples:
        raise reject("the prompt has nothing eSpeak NG can pronounce")
    return Output(
        data=wav_bytes(speech),
        mime_type="audio/wav",
        extension="wav",
        usage={"characters": len(prompt)},
        metadata={
            "model": MODEL,
            "development": True,
            "duration": round(speech.seconds, 3),
            "sample_rate": speech.sample_rate,
            "voice": parsed.voice,
        },
    )


def synthesize(prompt: str, parsed: AudioSettings) -> espeak.Speech:
    """The prompt as speech samples; the video renderer uses it for its soundtrack."""
    return espeak.speak(
        prompt, voice=parsed.voice, words_per_minute=parsed.speed, timeout_s=SYNTHESIS_TIMEOUT_S
    )


def wav_bytes(speech: espeak.Speech) -> bytes:
    """A mono 16-bit WAV file holding `speech`."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(speech.sample_rate)
        wav.writeframes(speech.samples)
    return buffer.getvalue()


def _require_words(prompt: str) -> None:
    if not prompt.strip():
        raise reject("speech needs a prompt with words to read")
