"""Fake OpenAI API: chat completions, images, speech and the async Videos API (API-NOTES 1)."""

from __future__ import annotations

import base64
import math
import uuid
from typing import Any, ClassVar

from tests.fakes.base import Behaviour, FakeServer, Reply, Request, bearer, main
from tests.fakes.media import mp3_bytes, mp4_bytes, png_bytes

V = "/v1"
ID = r"(?P<id>[^/]+)"
# API-NOTES 1.3: output tokens per gpt-image-1 image by quality and size.
IMAGE_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
# fmt: off
VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
          "shimmer", "verse", "marin", "cedar"}
# fmt: on
# fmt: off
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
               "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
# fmt: on


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope, the same on every endpoint."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class FakeOpenAI(FakeServer):
    """Fake OpenAI: sync chat/images/speech, and videos that advance one stage per poll."""

    routes: ClassVar = [
        ("POST", f"{V}/chat/completions", "chat"),
        ("POST", f"{V}/images/generations", "images"),
        ("POST", f"{V}/audio/speech", "speech"),
        ("POST", f"{V}/videos", "video_create"),
        ("GET", f"{V}/videos/{ID}", "video_get"),
        ("GET", f"{V}/videos/{ID}/content", "video_content"),
        ("DELETE", f"{V}/videos/{ID}", "video_delete"),
    ]
    scenarios = (*FakeServer.scenarios, "error", "rate_limited", "quota_exhausted", "filtered_chat")
    # polls_to_finish: GETs before a video leaves in_progress; video_outcome: completed|failed.
    defaults: ClassVar = {
        "polls_to_finish": 2,
        "video_outcome": "completed",
        "video_error_code": "internal_error",
        "reply": None,
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.videos: dict[str, dict[str, Any]] = {}

    # Scenarios ---------------------------------------------------------------------------

    def error(
        self,
        status: int,
        code: str | None = None,
        message: str = "error",
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ) -> Behaviour:
        return Reply(status, error_body(message, type, code), headers or {})

    def rate_limited(self, headers: dict | None = None) -> Behaviour:
        return Reply(
            429,
            error_body("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            headers or {},
        )

    def quota_exhausted(self) -> Behaviour:
        return Reply(
            429,
            error_body(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            ),
        )

    def filtered_chat(self) -> Behaviour:
        return lambda request: self._completion(request, "", "content_filter")

    # Routes ------------------------------------------------------------------------------

    def _refuse(self, request: Request) -> Reply | None:
        token = bearer(request)
        if token and (self.api_key is None or token == self.api_key):
            return None
        # Real OpenAI masks the key here; echoing it whole checks the adapter scrubs it.
        return Reply(
            401,
            error_body(
                f"Incorrect API key provided: {token}.", "invalid_request_error", "invalid_api_key"
            ),
        )

    def handle_chat(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        body = request.json() or {}
        if not body.get("model") or not body.get("messages"):
            missing = "model" if not body.get("model") else "messages"
            return Reply(
                400,
                error_body(
                    f"Missing required parameter: '{missing}'.",
                    "invalid_request_error",
                    None,
                    missing,
                ),
            )
        prompt = body["messages"][-1].get("content", "")
        return self._completion(request, self.config["reply"] or f"Echo: {prompt}", "stop")

    def _completion(self, request: Request, text: str, finish: str) -> Reply:
        body = request.json() or {}
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
        words = text.split(" ")
        if len(words) > limit:
            text, finish = " ".join(words[:limit]), "length"
        prompt_tokens = sum(4 + len(m.get("content", "")) // 4 for m in body.get("messages", []))
        completion = len(text.split(" ")) if text else 0
        return Reply(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": 1741569952,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            },
            {"x-request-id": f"req_{uuid.uuid4().hex[:16]}"},
        )

    def handle_images(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        body = request.json() or {}
        quality, size = body.get("quality", "auto"), body.get("size", "1024x1024")
        if "response_format" in body and str(body.get("model", "")).startswith("gpt-image"):
            return Reply(
                400,
                error_body(
                    "Unknown parameter: 'response_format'.",
                    "invalid_request_error",
                    "unknown_parameter",
                    "response_format",
                ),
            )
        tokens = IMAGE_TOKENS["high" if quality == "auto" else quality].get(size)
        if not body.get("prompt") or tokens is None:
            param = "prompt" if not body.get("prompt") else "size"
            return Reply(
                400,
                error_body(
                    f"Invalid value for '{param}'.", "invalid_request_error", "invalid_value", param
                ),
            )
        image = base64.b64encode(png_bytes(16, 16, (0, 128, 255))).decode()
        text_tokens = math.ceil(len(body["prompt"]) / 4)
        return Reply(
            200,
            {
                "created": 1713833628,
                "data": [{"b64_json": image}] * int(body.get("n", 1)),
                "background": "opaque",
                "output_format": body.get("output_format", "png"),
                "quality": quality,
                "size": size,
                "usage": {
                    "input_tokens": text_tokens,
                    "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
                    "output_tokens": tokens,
                    "output_tokens_details": {"image_tokens": tokens, "text_tokens": 0},
                    "total_tokens": text_tokens + tokens,
                },
            },
        )

    def handle_speech(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        body = request.json() or {}
        text, fmt = body.get("input", ""), body.get("response_format", "mp3")
        for param, bad in (
            ("input", not text or len(text) > 4096),
            ("voice", body.get("voice") not in VOICES),
            ("response_format", fmt not in AUDIO_TYPES),
        ):
            if bad:
                return Reply(
                    400,
                    error_body(
                        f"Invalid value for '{param}'.",
                        "invalid_request_error",
                        "invalid_value",
                        param,
                    ),
                )
        return Reply(200, mp3_bytes(text), {"Content-Type": AUDIO_TYPES[fmt]})

    def handle_video_create(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        form = request.form()
        if not form.get("prompt"):
            return Reply(
                400,
                error_body(
                    "Missing required parameter: 'prompt'.", "invalid_request_error", None, "prompt"
                ),
            )
        video = {
            "id": f"video_{uuid.uuid4().hex}",
            "object": "video",
            "model": form.get("model", "sora-2"),
            "status": "queued",
            "progress": 0,
            "created_at": 1758941485,
            "completed_at": None,
            "expires_at": None,
            "seconds": form.get("seconds", "4"),
            "size": form.get("size", "720x1280"),
            "prompt": form["prompt"],
            "remixed_from_video_id": None,
            "error": None,
        }
        with self.lock:
            self.videos[video["id"]] = {
                "video": video,
                "polls": 0,
                "outcome": self.config["video_outcome"],
            }
        return Reply(200, video)

    def handle_video_get(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        with self.lock:
            job = self.videos.get(request.params["id"])
            if job is None:
                return Reply(404, error_body("Video not found", "invalid_request_error"))
            job["polls"] += 1
            video = job["video"]
            if job["polls"] >= self.config["polls_to_finish"]:
                video.update(status=job["outcome"], progress=100, completed_at=1758941600)
                if job["outcome"] == "failed":
                    video["error"] = {
                        "code": self.config["video_error_code"],
                        "message": "Video generation failed.",
                    }
            else:
                video.update(status="in_progress", progress=50)
            return Reply(200, dict(video), {"openai-poll-after-ms": "10"})

    def handle_video_content(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        job = self.videos.get(request.params["id"])
        if job is None or job["video"]["status"] != "completed":
            return Reply(404, error_body("Video is not ready.", "invalid_request_error"))
        return Reply(200, mp4_bytes(job["video"]["id"]), {"Content-Type": "video/mp4"})

    def handle_video_delete(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        with self.lock:
            if self.videos.pop(request.params["id"], None) is None:
                return Reply(404, error_body("Video not found", "invalid_request_error"))
        return Reply(200, {"id": request.params["id"], "object": "video.deleted", "deleted": True})


if __name__ == "__main__":
    main(FakeOpenAI)
