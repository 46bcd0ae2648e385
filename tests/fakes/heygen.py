"""Fake HeyGen API: v2 video generate, v1 status polling and expiring video URLs (API-NOTES 5)."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from tests.fakes.base import Behaviour, FakeServer, Reply, Request, main
from tests.fakes.media import mp4_bytes, png_bytes

STAGES = ("pending", "waiting", "processing")  # then the outcome


def envelope_error(code: str, message: str) -> dict[str, Any]:
    """The v2 error envelope third-party clients read: a non-null `error`, null `data`."""
    return {"error": {"code": code, "message": message}, "data": None}


class FakeHeyGen(FakeServer):
    """Fake HeyGen: videos go pending -> waiting -> processing -> outcome, one stage per poll."""

    routes: ClassVar = [
        ("POST", r"/v2/video/generate", "generate"),
        ("GET", r"/v1/video_status\.get", "status"),
        ("GET", r"/files/(?P<name>[^/]+)", "download"),
    ]
    scenarios = (*FakeServer.scenarios, "error", "out_of_credits")
    # seconds_per_word sets the reported duration; outcome: completed | failed.
    defaults: ClassVar = {
        "polls_to_finish": 3,
        "outcome": "completed",
        "seconds_per_word": 0.4,
        "failure": "Video duration exceeds limit",
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.videos: dict[str, dict[str, Any]] = {}

    def error(
        self,
        status: int,
        code: str = "invalid_parameter",
        message: str = "error",
        headers: dict | None = None,
    ) -> Behaviour:
        return Reply(status, envelope_error(code, message), headers or {})

    def out_of_credits(self) -> Behaviour:
        return self.error(402, "insufficient_credit", "Insufficient credit to generate video.")

    def _refuse(self, request: Request) -> Reply | None:
        key = request.headers.get("x-api-key", "")
        if key and (self.api_key is None or key == self.api_key):
            return None
        return Reply(401, envelope_error("unauthorized", f"Invalid api key {key}"))

    def handle_generate(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        body = request.json() or {}
        scenes = body.get("video_inputs")
        if not isinstance(scenes, list) or not 1 <= len(scenes) <= 50:
            return Reply(400, envelope_error("invalid_parameter", "video_inputs is required"))
        voice = scenes[0].get("voice") or {}
        if voice.get("type") == "text" and not voice.get("input_text"):
            return Reply(400, envelope_error("invalid_parameter", "input_text is required"))
        video_id = uuid.uuid4().hex
        words = sum(len((s.get("voice") or {}).get("input_text", "").split()) for s in scenes)
        with self.lock:
            self.videos[video_id] = {
                "polls": 0,
                "outcome": self.config["outcome"],
                "callback_id": body.get("callback_id"),
                "duration": round(words * self.config["seconds_per_word"], 2),
            }
        return Reply(200, {"error": None, "data": {"video_id": video_id}})

    def handle_status(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        video_id = request.query.get("video_id", "")
        with self.lock:
            video = self.videos.get(video_id)
            if video is None:
                return Reply(404, {"code": 40014, "message": "Video not found"})
            video["polls"] += 1
            finished = video["polls"] >= self.config["polls_to_finish"]
            status = video["outcome"] if finished else STAGES[min(video["polls"], 2)]
        data = {
            "id": video_id,
            "status": status,
            "video_url": None,
            "thumbnail_url": None,
            "gif_url": None,
            "duration": None,
            "created_at": 1718000000,
            "callback_id": video["callback_id"],
            "caption_url": None,
            "video_url_caption": None,
            "error": None,
        }
        if status == "completed":
            data.update(
                video_url=f"{self.url}/files/{video_id}.mp4?Expires=1718600000",
                thumbnail_url=f"{self.url}/files/{video_id}.jpg?Expires=1718600000",
                duration=video["duration"],
            )
        elif status == "failed":
            data["error"] = self.config["failure"]
        return Reply(200, {"code": 100, "message": "Success", "data": data})

    def handle_download(self, request: Request) -> Reply:
        video_id, _, suffix = request.params["name"].rpartition(".")
        if video_id not in self.videos or "Expires" not in request.query:
            return Reply(404, "Not Found")
        if suffix == "jpg":
            return Reply(200, png_bytes(), {"Content-Type": "image/png"})
        return Reply(200, mp4_bytes(video_id), {"Content-Type": "video/mp4"})


if __name__ == "__main__":
    main(FakeHeyGen)
