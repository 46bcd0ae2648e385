"""ElevenLabs: text to speech with a voice and model, billed by `character-cost` (API-NOTES 3)."""

from __future__ import annotations

import math
from typing import Any

import requests

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import (
    AuthError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.http import DEFAULT_TIMEOUT, HttpClient, Settings, require_api_key

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
NAME = "elevenlabs"
DEFAULT_VOICE = "JBFqnCBsd6RMkjVDRZzb"  # the voice in the SDK's own examples
DEFAULT_MODEL = "eleven_multilingual_v2"

# API-NOTES 3.4: credits per input character on self-serve plans.
MODEL_MULTIPLIERS = {
    "eleven_multilingual_v2": 1.0,
    "eleven_v3": 1.0,
    "eleven_monolingual_v1": 1.0,
    "eleven_multilingual_v1": 1.0,
    "eleven_flash_v2": 0.5,
    "eleven_flash_v2_5": 0.5,
    "eleven_turbo_v2": 0.5,
    "eleven_turbo_v2_5": 0.5,
}
OUTPUT_FORMATS = (
    "mp3_22050_32",
    "mp3_24000_48",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_32000",
    "pcm_44100",
    "pcm_48000",
    "wav_8000",
    "wav_16000",
    "wav_22050",
    "wav_24000",
    "wav_32000",
    "wav_44100",
    "wav_48000",
    "ulaw_8000",
    "alaw_8000",
    "opus_48000_32",
    "opus_48000_64",
    "opus_48000_96",
    "opus_48000_128",
    "opus_48000_192",
)
CODECS = {
    "mp3": ("audio/mpeg", "mp3"),
    "pcm": ("audio/pcm", "pcm"),
    "wav": ("audio/wav", "wav"),
    "ulaw": ("audio/basic", "ulaw"),
    "alaw": ("audio/x-alaw-basic", "alaw"),
    "opus": ("audio/ogg", "opus"),
}

# `detail.status` words (API-NOTES 3.3): running out of credits comes back as a 401.
ERROR_CODES: dict[str, type[ProviderError]] = {
    "quota_exceeded": QuotaExhaustedError,
    "invalid_api_key": AuthError,
    "too_many_concurrent_requests": TransientError,
    "system_busy": TransientError,
    "internal_error": TransientError,
}
# Settings name -> the vendor's voice_settings field.
VOICE_SETTINGS = {
    "stability": "stability",
    "similarityBoost": "similarity_boost",
    "style": "style",
    "speed": "speed",
}


def _describe(body: Any) -> tuple[list[str], str]:
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, dict):
        status = detail.get("status")
        return [status] if isinstance(status, str) else [], str(detail.get("message") or "")
    if isinstance(detail, list):  # FastAPI validation errors
        return [], "; ".join(
            f"{'.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    return [], str(detail)[:300]


class ElevenLabsProvider:
    """ElevenLabs text to speech, synchronous; usage is the billed characters it reports.

    Settings: `voiceId`, `modelId`, `outputFormat`, `stability`, `similarityBoost`, `style`,
    `speed`, `languageCode`, `seed`.
    """

    name = NAME
    content_types = frozenset({"audio"})

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
    ):
        self._http = HttpClient(
            NAME, base_url, timeout=timeout, session=session, describe=_describe, codes=ERROR_CODES
        )

    def __repr__(self) -> str:
        return f"ElevenLabsProvider({self._http.base_url!r})"

    def _parse(self, content_type: str, prompt: str, settings: dict) -> tuple[dict, str, str]:
        """The validated JSON body, voice id and output format of one request."""
        if content_type != "audio":
            raise RejectedError(f"elevenlabs: cannot make {content_type}", provider=NAME)
        if not prompt.strip():
            raise RejectedError("elevenlabs: the text to speak is empty", provider=NAME)
        s = Settings(NAME, settings)
        # 0-1 per API-NOTES 3.2; speed's 0.7-1.2 is ElevenLabs' own range (not in the notes).
        voice_settings = {
            field: s.number(name, None, *((0.7, 1.2) if name == "speed" else (0.0, 1.0)))
            for name, field in VOICE_SETTINGS.items()
        }
        body = {
            "text": prompt,
            "model_id": s.choice("modelId", DEFAULT_MODEL, MODEL_MULTIPLIERS),
            "voice_settings": {k: v for k, v in voice_settings.items() if v is not None} or None,
            "language_code": s.text("languageCode", None, 8),
            "seed": s.integer("seed", None, 0, 4_294_967_295),
        }
        return (
            {k: v for k, v in body.items() if v is not None},
            s.text("voiceId", DEFAULT_VOICE, 64) or DEFAULT_VOICE,
            s.choice("outputFormat", "mp3_44100_128", OUTPUT_FORMATS),
        )

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        # Some library voices carry their own multiplier; the model's is the documented one.
        body, _, _ = self._parse(content_type, prompt, settings)
        return {"characters": math.ceil(len(prompt) * MODEL_MULTIPLIERS[body["model_id"]])}

    def start(self, request: GenerationRequest) -> Output:
        body, voice, output_format = self._parse(
            request.content_type, request.prompt, request.settings
        )
        response = self._http.send(
            "POST",
            f"/v1/text-to-speech/{requests.utils.quote(voice, safe='')}",
            params={"output_format": output_format},
            json=body,
            headers={"xi-api-key": require_api_key(request, NAME), "Accept": "audio/*"},
        )
        mime, extension = CODECS[output_format.split("_")[0]]
        cost = response.headers.get("character-cost")
        # The header is the billed amount after the model multiplier; trust it over our estimate.
        usage = (
            {"characters": float(cost)}
            if cost and _is_number(cost)
            else self.estimate_usage(request.content_type, request.prompt, request.settings)
        )
        return Output(
            response.content,
            mime,
            extension,
            usage,
            {
                "voice_id": voice,
                "model_id": body["model_id"],
                "output_format": output_format,
                "request_id": response.headers.get("request-id"),
                "history_item_id": response.headers.get("history-item-id"),
            },
        )

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        raise RejectedError("elevenlabs: speech finishes in start()", provider=NAME)

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        """Nothing to cancel: speech is one synchronous call."""


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
