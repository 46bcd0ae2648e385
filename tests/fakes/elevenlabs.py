"""Fake ElevenLabs text-to-speech endpoint with its real headers and error bodies (API-NOTES 3)."""

from __future__ import annotations

import math
import uuid
from typing import Any, ClassVar

from tests.fakes.base import Behaviour, FakeServer, Reply, Request, main
from tests.fakes.media import mp3_bytes

MULTIPLIERS = {
    "eleven_multilingual_v2": 1.0,
    "eleven_v3": 1.0,
    "eleven_flash_v2_5": 0.5,
    "eleven_turbo_v2_5": 0.5,
    "eleven_flash_v2": 0.5,
    "eleven_turbo_v2": 0.5,
    "eleven_monolingual_v1": 1.0,
    "eleven_multilingual_v1": 1.0,
}
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "ulaw": "audio/basic",
    "alaw": "audio/x-alaw-basic",
    "opus": "audio/ogg",
}


def error_body(status: str, message: str) -> dict[str, Any]:
    """ElevenLabs' `{"detail": {"status", "message"}}` error shape."""
    return {"detail": {"status": status, "message": message}}


class FakeElevenLabs(FakeServer):
    """Fake ElevenLabs: audio bytes with `character-cost`, `request-id` and friends."""

    routes: ClassVar = [("POST", r"/v1/text-to-speech/(?P<voice>[^/]+)", "tts")]
    scenarios = (*FakeServer.scenarios, "error", "quota_exceeded", "busy")
    defaults: ClassVar = {"voices": ["JBFqnCBsd6RMkjVDRZzb", "21m00Tcm4TlvDq8ikWAM"]}

    def error(
        self, status: int, code: str, message: str = "error", headers: dict | None = None
    ) -> Behaviour:
        return Reply(status, error_body(code, message), headers or {})

    def quota_exceeded(self) -> Behaviour:
        return self.error(
            401,
            "quota_exceeded",
            "This request exceeds your quota of 10000. You have 11 credits "
            "remaining, while 102 credits are required.",
        )

    def busy(self, headers: dict | None = None) -> Behaviour:
        return self.error(
            429, "too_many_concurrent_requests", "Too many concurrent requests.", headers
        )

    def handle_tts(self, request: Request) -> Reply:
        key = request.headers.get("xi-api-key", "")
        if not key:
            return Reply(401, {"detail": "Unauthenticated"})
        if self.api_key is not None and key != self.api_key:
            return Reply(401, error_body("invalid_api_key", f"Invalid API key: {key}"))
        body = request.json() or {}
        if not body.get("text"):
            return Reply(
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
            )
        model = body.get("model_id", "eleven_multilingual_v2")
        if model not in MULTIPLIERS:
            return Reply(400, error_body("invalid_model", f"Model {model} does not exist."))
        if request.params["voice"] not in self.config["voices"]:
            return Reply(
                404,
                error_body(
                    "voice_not_found",
                    f"A voice with voice_id {request.params['voice']} was not found.",
                ),
            )
        codec = request.query.get("output_format", "mp3_44100_128").split("_")[0]
        cost = math.ceil(len(body["text"]) * MULTIPLIERS[model])
        return Reply(
            200,
            mp3_bytes(body["text"]),
            {
                "Content-Type": CONTENT_TYPES.get(codec, "application/octet-stream"),
                "request-id": uuid.uuid4().hex[:20],
                "history-item-id": uuid.uuid4().hex[:20],
                "character-cost": str(cost),
                "current-concurrent-requests": "1",
                "maximum-concurrent-requests": "3",
            },
        )


if __name__ == "__main__":
    main(FakeElevenLabs)
