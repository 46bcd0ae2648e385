"""Fake Stability AI v2beta Stable Image generate endpoints (API-NOTES section 2)."""

from __future__ import annotations

import base64
import random
import uuid
from typing import Any, ClassVar

from tests.fakes.base import Behaviour, FakeServer, Reply, Request, bearer, main
from tests.fakes.media import png_bytes

RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
SD3_MODELS = (
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "sd3-large",
    "sd3-large-turbo",
    "sd3-medium",
)
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def error_body(name: str, *errors: str) -> dict[str, Any]:
    """Stability's error shape (live-verified per API-NOTES 2.4)."""
    return {"id": uuid.uuid4().hex, "name": name, "errors": list(errors)}


class FakeStability(FakeServer):
    """Fake Stability: multipart in, image bytes (Accept: image/*) or JSON out."""

    routes: ClassVar = [
        ("POST", r"/v2beta/stable-image/generate/(?P<model>core|ultra|sd3)", "generate"),
    ]
    scenarios = (
        *FakeServer.scenarios,
        "error",
        "rate_limited",
        "quota_exhausted",
        "filtered",
        "moderated",
    )

    def error(
        self, status: int, name: str, message: str = "error", headers: dict | None = None
    ) -> Behaviour:
        return Reply(status, error_body(name, message), headers or {})

    def rate_limited(self, headers: dict | None = None) -> Behaviour:
        return self.error(
            429,
            "rate_limit_exceeded",
            "You have exceeded the rate limit of 150 requests within a 10 second "
            "period, and have been timed out for 60 seconds.",
            headers,
        )

    def quota_exhausted(self) -> Behaviour:
        return self.error(
            402,
            "payment_required",
            "You lack sufficient credits to make this request. Please purchase "
            "more credits at https://platform.stability.ai/account/credits and "
            "try again.",
        )

    def moderated(self) -> Behaviour:
        return self.error(
            403, "content_moderation", "Your request was flagged by our content moderation system."
        )

    def filtered(self) -> Behaviour:
        """A 200 whose finish reason is CONTENT_FILTERED, as the real API does."""
        return lambda request: self._image(request, request.form(), "CONTENT_FILTERED")

    def handle_generate(self, request: Request) -> Reply:
        token = bearer(request)
        if not token or (self.api_key is not None and token != self.api_key):
            return Reply(401, error_body("unauthorized", f"Incorrect API key provided: {token}"))
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return Reply(400, error_body("bad_request", "content-type: required"))
        form = request.form()
        problems = [
            "prompt: is required" if not form.get("prompt") else "",
            "aspect_ratio: invalid" if form.get("aspect_ratio", "1:1") not in RATIOS else "",
            "output_format: invalid" if form.get("output_format", "png") not in FORMATS else "",
            "model: invalid"
            if request.params["model"] == "sd3"
            and form.get("model", "sd3.5-large") not in SD3_MODELS
            else "",
        ]
        if any(problems):
            return Reply(400, error_body("bad_request", *filter(None, problems)))
        return self._image(request, form, "SUCCESS")

    def _image(self, request: Request, form: dict[str, str], finish: str) -> Reply:
        width, height = (int(n) * 2 for n in form.get("aspect_ratio", "1:1").split(":"))
        colour = (40, 40, 40) if finish == "CONTENT_FILTERED" else (200, 120, 0)
        image = png_bytes(width, height, colour)
        seed = int(form.get("seed") or 0) or random.randint(1, 4_294_967_294)
        if request.headers.get("accept", "").startswith("application/json"):
            return Reply(
                200,
                {"image": base64.b64encode(image).decode(), "finish_reason": finish, "seed": seed},
            )
        return Reply(
            200,
            image,
            {
                "Content-Type": FORMATS[form.get("output_format", "png")],
                "finish-reason": finish,
                "seed": str(seed),
            },
        )


if __name__ == "__main__":
    main(FakeStability)
