"""Stability AI: Stable Image core, ultra and sd3 generation over v2beta (API-NOTES section 2)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import requests

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import (
    ContentFilteredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.http import DEFAULT_TIMEOUT, HttpClient, Settings, require_api_key

DEFAULT_BASE_URL = "https://api.stability.ai"
NAME = "stability"

# Our `model` setting -> (endpoint under /v2beta/stable-image/generate/, sd3's `model` field).
MODELS = {
    "core": ("core", None),
    "ultra": ("ultra", None),
    "sd3.5-large": ("sd3", "sd3.5-large"),
    "sd3.5-large-turbo": ("sd3", "sd3.5-large-turbo"),
    "sd3.5-medium": ("sd3", "sd3.5-medium"),
}
ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
STYLE_PRESETS = (
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "modeling-compound",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "tile-texture",
)
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# The error body's `name` (API-NOTES 2.4); Stability's 403 is moderation, not a bad key.
ERROR_NAMES: dict[str, type[ProviderError]] = {
    "payment_required": QuotaExhaustedError,
    "content_moderation": ContentFilteredError,
    "rate_limit_exceeded": TransientError,
    "internal_error": TransientError,
}
STATUS_ERRORS: dict[int, type[ProviderError]] = {
    402: QuotaExhaustedError,
    403: ContentFilteredError,
}
# A 429 locks the account out for 60 s and no Retry-After header is documented.
RATE_LIMIT_WAIT = 60.0


def _describe(body: Any) -> tuple[list[str], str]:
    if not isinstance(body, dict):
        return [], str(body)[:300]
    errors = body.get("errors")
    message = "; ".join(map(str, errors)) if isinstance(errors, list) else body.get("message")
    return [body["name"]] if isinstance(body.get("name"), str) else [], str(message or "")


class StabilityProvider:
    """Stability's synchronous Stable Image endpoints; one image per job, billed per image.

    Settings: `model` (core, ultra, sd3.5-large, sd3.5-large-turbo, sd3.5-medium),
    `aspectRatio`, `negativePrompt`, `seed`, `outputFormat`, `stylePreset`.
    """

    name = NAME
    content_types = frozenset({"image"})

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
    ):
        self._http = HttpClient(
            NAME,
            base_url,
            timeout=timeout,
            session=session,
            describe=_describe,
            codes=ERROR_NAMES,
            statuses=STATUS_ERRORS,
            rate_limit_wait=RATE_LIMIT_WAIT,
        )

    def __repr__(self) -> str:
        return f"StabilityProvider({self._http.base_url!r})"

    def _form(self, content_type: str, prompt: str, settings: dict) -> tuple[str, dict]:
        """The model and the validated form fields for one request."""
        if content_type != "image":
            raise RejectedError(f"stability: cannot make {content_type}", provider=NAME)
        if not prompt.strip() or len(prompt) > 10_000:
            raise RejectedError(
                "stability: the prompt must be 1 to 10000 characters", provider=NAME
            )
        s = Settings(NAME, settings)
        model = s.choice("model", "core", MODELS)
        endpoint, sd3_model = MODELS[model]
        formats = ("png", "jpeg") if endpoint == "sd3" else tuple(FORMATS)
        form = {
            "prompt": prompt,
            "aspect_ratio": s.choice("aspectRatio", "1:1", ASPECT_RATIOS),
            "output_format": s.choice("outputFormat", "png", formats),
            "negative_prompt": s.text("negativePrompt", None),
            "seed": s.integer("seed", None, 0, 4_294_967_294),
            "style_preset": s.choice("stylePreset", "", STYLE_PRESETS) or None,
            "model": sd3_model,
        }
        if model == "sd3.5-large-turbo" and form["negative_prompt"]:
            raise s.reject("negativePrompt", "absent: sd3.5-large-turbo takes no negative prompt")
        return model, {k: str(v) for k, v in form.items() if v is not None}

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        # A flat price per successful image; filtered requests are reported as not charged.
        model, _ = self._form(content_type, prompt, settings)
        return {f"{model}_images": 1}

    def start(self, request: GenerationRequest) -> Output:
        model, form = self._form(request.content_type, request.prompt, request.settings)
        headers = {"Authorization": f"Bearer {require_api_key(request, NAME)}", "Accept": "image/*"}
        # The API wants multipart even without a file; an empty part forces requests to build it.
        response = self._http.send(
            "POST",
            f"/v2beta/stable-image/generate/{MODELS[model][0]}",
            headers=headers,
            data=form,
            files={"none": ""},
        )
        content_type = response.headers.get("Content-Type", "").split(";")[0]
        if content_type == "application/json":  # a proxy or an old API version answered JSON
            body = self._http.json(response)
            image, finish = _decode(body.get("image")), body.get("finish_reason")
            seed, content_type = body.get("seed"), FORMATS[form["output_format"]]
        else:
            image, seed = response.content, response.headers.get("seed")
            finish = response.headers.get("finish-reason")
        # A 200 can carry CONTENT_FILTERED with a blurred image: anything but SUCCESS fails
        # (no finish reason at all, as when a proxy drops the header, is taken as success).
        if finish == "CONTENT_FILTERED":
            raise ContentFilteredError("stability: the output was filtered", provider=NAME)
        if finish not in (None, "SUCCESS"):
            raise RejectedError(f"stability: finish-reason {finish}"[:200], provider=NAME)
        fmt = next(
            (f for f, mime in FORMATS.items() if mime == content_type), form["output_format"]
        )
        return Output(
            image,
            FORMATS[fmt],
            "jpg" if fmt == "jpeg" else fmt,
            {f"{model}_images": 1},
            {"model": model, "seed": seed},
        )

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        raise RejectedError("stability: image generation finishes in start()", provider=NAME)

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        """Nothing to cancel: generation is one synchronous call."""


def _decode(data: Any) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise TransientError(
            "stability: JSON response without a base64 image", provider=NAME
        ) from None
