"""OpenAI: chat text, GPT image, speech and Sora video over the REST API (API-NOTES section 1)."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import requests

from pipeline.provider import CONTENT_TYPES, GenerationRequest, Output, Pending
from pipeline.provider_errors import (
    AuthError,
    ContentFilteredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.http import DEFAULT_TIMEOUT, HttpClient, Settings, require_api_key

DEFAULT_BASE_URL = "https://api.openai.com/v1"
NAME = "openai"

# Vendor codes (error.code, then error.type) that say more than the status does.
ERROR_CODES: dict[str, type[ProviderError]] = {
    "insufficient_quota": QuotaExhaustedError,  # a 429 that must not be retried
    "invalid_api_key": AuthError,
    "rate_limit_exceeded": TransientError,
    "server_is_overloaded": TransientError,
    "slow_down": TransientError,
    # Safety-system refusals of image prompts; named in SDK users' reports, not in API-NOTES.
    "content_policy_violation": ContentFilteredError,
    "moderation_blocked": ContentFilteredError,
}

# API-NOTES 1.3: gpt-image-1 output tokens per image are fixed by quality and size.
IMAGE_OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
# Only the models the price table can price exactly are accepted.
IMAGE_MODELS = ("gpt-image-1",)
SPEECH_UNITS = {"tts-1": "characters", "tts-1-hd": "hd_characters"}
# fmt: off
SPEECH_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse", "marin", "cedar")
SPEECH_FORMATS = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                  "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
# fmt: on
# API-NOTES 1.5: sora-2 renders only the 720p sizes; the tall/wide 1792 sizes need sora-2-pro.
VIDEO_SIZES = {
    "sora-2": ("720x1280", "1280x720"),
    "sora-2-pro": ("720x1280", "1280x720", "1024x1792", "1792x1024"),
}
VIDEO_FAILURES: dict[str, type[RejectedError]] = {
    "moderation_blocked": ContentFilteredError,
    "content_policy_violation": ContentFilteredError,
}
MESSAGE_OVERHEAD_TOKENS = 16  # role markers and framing around each chat message


def _describe(body: Any) -> tuple[list[str], str]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return [], str(body)[:300]
    message = error.get("message") or ""
    if error.get("param"):
        message = f"{message} (param: {error['param']})"
    return [c for c in (error.get("code"), error.get("type")) if isinstance(c, str)], message


def _tokens(text: str) -> int:
    # A token is at least one byte; a third of the UTF-8 length over-counts English and CJK alike.
    return math.ceil(len(text.encode("utf-8")) / 3) + MESSAGE_OVERHEAD_TOKENS


def _video_unit(model: str, size: str) -> str:
    if model == "sora-2":
        return "seconds"
    return "pro_hd_seconds" if "1792" in size else "pro_seconds"


class OpenAIProvider:
    """OpenAI, or for text any server that speaks its chat API (base_url is `OPENAI_BASE_URL`).

    Settings: text `model`, `maxTokens`, `temperature`, `systemPrompt`; image `quality`, `size`,
    `outputFormat`; audio `model`, `voice`, `format`, `speed`; video `model`, `seconds`, `size`.
    """

    name = NAME
    content_types = frozenset(CONTENT_TYPES)

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
        return f"OpenAIProvider({self._http.base_url!r})"

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        s = Settings(NAME, settings)
        if content_type == "text":
            system = s.text("systemPrompt", "") or ""
            s.text("model", None, 200)
            s.number("temperature", None, 0, 2)
            return {
                "input_tokens": _tokens(system + prompt),
                "output_tokens": s.integer("maxTokens", 1024, 1, 128_000),
            }
        if content_type == "image":
            s.choice("model", IMAGE_MODELS[0], IMAGE_MODELS)
            sizes = IMAGE_OUTPUT_TOKENS[s.choice("quality", "medium", IMAGE_OUTPUT_TOKENS)]
            size = s.choice("size", "1024x1024", [*sizes, "auto"])
            s.choice("outputFormat", "png", ("png", "jpeg", "webp"))
            output = max(sizes.values()) if size == "auto" else sizes[size]
            return {"input_tokens": _tokens(prompt), "output_tokens": output}
        if content_type == "audio":
            if len(prompt) > 4096:
                raise RejectedError(
                    "openai: speech input is limited to 4096 characters", provider=NAME
                )
            s.choice("voice", "alloy", SPEECH_VOICES)
            s.choice("format", "mp3", SPEECH_FORMATS)
            s.number("speed", 1.0, 0.25, 4.0)
            return {SPEECH_UNITS[s.choice("model", "tts-1", SPEECH_UNITS)]: len(prompt)}
        if content_type == "video":
            model = s.choice("model", "sora-2", VIDEO_SIZES)
            size = s.choice("size", "720x1280", VIDEO_SIZES[model])
            seconds = int(s.choice("seconds", "4", ("4", "8", "12")))
            return {_video_unit(model, size): seconds}
        raise RejectedError(f"openai: cannot make {content_type}", provider=NAME)

    def start(self, request: GenerationRequest) -> Output | Pending:
        estimate = self.estimate_usage(request.content_type, request.prompt, request.settings)
        headers = {"Authorization": f"Bearer {require_api_key(request, NAME)}"}
        make = {
            "text": self._text,
            "image": self._image,
            "audio": self._speech,
            "video": self._start_video,
        }[request.content_type]
        return make(request, Settings(NAME, request.settings), headers, estimate)

    def _text(self, request: GenerationRequest, s: Settings, headers: dict, estimate: dict):
        messages = [{"role": "user", "content": request.prompt}]
        system, temperature = s.text("systemPrompt", None), s.number("temperature", None, 0, 2)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        body = {
            "model": s.text("model", "gpt-4o-mini", 200),
            "messages": messages,
            "max_completion_tokens": estimate["output_tokens"],
        }
        if temperature is not None:
            body["temperature"] = temperature
        response = self._http.send("POST", "/chat/completions", headers=headers, json=body)
        data = self._http.json(response)
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        if choice.get("finish_reason") == "content_filter" or message.get("refusal"):
            raise ContentFilteredError(
                f"openai: the model refused: {message.get('refusal') or 'content filter'}"[:500],
                provider=NAME,
            )
        text = message.get("content") or ""
        usage = data.get("usage") or {}
        # Some OpenAI-compatible servers omit usage; the estimate then bounds the charge.
        tokens = {
            "input_tokens": usage.get("prompt_tokens", estimate["input_tokens"]),
            "output_tokens": usage.get("completion_tokens", _tokens(text)),
        }
        return Output(
            text.encode(),
            "text/plain",
            "txt",
            tokens,
            {
                "model": data.get("model"),
                "finish_reason": choice.get("finish_reason"),
                "request_id": response.headers.get("x-request-id"),
            },
        )

    def _image(self, request: GenerationRequest, s: Settings, headers: dict, estimate: dict):
        fmt = s.choice("outputFormat", "png", ("png", "jpeg", "webp"))
        body = {
            "model": s.choice("model", IMAGE_MODELS[0], IMAGE_MODELS),
            "prompt": request.prompt,
            "n": 1,
            "size": s.values.get("size", "1024x1024"),
            "quality": s.values.get("quality", "medium"),
            "output_format": fmt,
        }
        response = self._http.send("POST", "/images/generations", headers=headers, json=body)
        data = self._http.json(response)
        try:
            image = base64.b64decode(data["data"][0]["b64_json"], validate=True)
        except (KeyError, IndexError, TypeError, binascii.Error):
            raise TransientError(
                "openai: image response without b64_json data", provider=NAME
            ) from None
        usage = data.get("usage") or {}
        return Output(
            image,
            f"image/{fmt}",
            "jpg" if fmt == "jpeg" else fmt,
            {unit: usage.get(unit, estimate[unit]) for unit in ("input_tokens", "output_tokens")},
            {"model": body["model"], "size": data.get("size"), "quality": data.get("quality")},
        )

    def _speech(self, request: GenerationRequest, s: Settings, headers: dict, estimate: dict):
        fmt = s.values.get("format", "mp3")
        body = {
            "model": s.values.get("model", "tts-1"),
            "input": request.prompt,
            "voice": s.values.get("voice", "alloy"),
            "response_format": fmt,
            "speed": s.values.get("speed", 1.0),
        }
        response = self._http.send(
            "POST",
            "/audio/speech",
            json=body,
            headers={**headers, "Accept": "application/octet-stream"},
        )
        return Output(
            response.content,
            SPEECH_FORMATS[fmt],
            fmt,
            estimate,
            {"model": body["model"], "voice": body["voice"]},
        )

    def _start_video(self, request: GenerationRequest, s: Settings, headers: dict, estimate: dict):
        # The SDK always sends multipart; (None, value) parts make requests build that form.
        fields = {
            "prompt": request.prompt,
            "model": s.values.get("model", "sora-2"),
            "seconds": s.values.get("seconds", "4"),
            "size": s.values.get("size", "720x1280"),
        }
        files = {name: (None, str(value)) for name, value in fields.items()}
        response = self._http.send("POST", "/videos", headers=headers, files=files)
        return self._video_state(self._http.json(response), request, headers)

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        if request.content_type != "video":
            raise RejectedError(
                f"openai: {request.content_type} jobs finish in start()", provider=NAME
            )
        headers = {"Authorization": f"Bearer {require_api_key(request, NAME)}"}
        response = self._http.send("GET", f"/videos/{remote_id}", headers=headers)
        return self._video_state(self._http.json(response), request, headers)

    def _video_state(self, video: dict, request: GenerationRequest, headers: dict):
        status, video_id = video.get("status"), video.get("id", "")
        if status == "failed":
            error = video.get("error") or {}
            raise VIDEO_FAILURES.get(error.get("code"), RejectedError)(
                f"openai: video failed: {error.get('message') or error.get('code')}"[:500],
                provider=NAME,
            )
        if status != "completed":
            return Pending(video_id, (video.get("progress") or 0) / 100, status or "")
        response = self._http.send(
            "GET",
            f"/videos/{video_id}/content",
            headers={**headers, "Accept": "application/binary"},
        )
        model = video.get("model") or request.settings.get("model", "sora-2")
        size = video.get("size") or request.settings.get("size", "720x1280")
        # Snapshots such as sora-2-pro-2025-10-06 bill like their family.
        family = "sora-2-pro" if model.startswith("sora-2-pro") else "sora-2"
        seconds = int(video.get("seconds") or request.settings.get("seconds", "4"))
        return Output(
            response.content,
            "video/mp4",
            "mp4",
            {_video_unit(family, size): seconds},
            {"model": model, "size": size, "video_id": video_id},
        )

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        if request.content_type == "video":
            headers = {"Authorization": f"Bearer {require_api_key(request, NAME)}"}
            # 404: already deleted or expired, which is what cancel wants.
            self._http.send("DELETE", f"/videos/{remote_id}", headers=headers, allow=(404,))
