"""Runway: text/image to video and text to image as polled tasks (API-NOTES section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import (
    ContentFilteredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
)
from providers.http import DEFAULT_TIMEOUT, HttpClient, Settings, require_api_key

DEFAULT_BASE_URL = "https://api.dev.runwayml.com"
API_VERSION = "2024-11-06"  # required on every call, X-Runway-Version
NAME = "runway"


@dataclass(frozen=True)
class VideoModel:
    text_ratios: tuple[str, ...]  # empty: no text_to_video for this model
    image_ratios: tuple[str, ...]
    durations: tuple[int, ...]
    default_duration: int


_GEN4_IMAGE_RATIOS = ("1280:720", "720:1280", "1104:832", "832:1104", "960:960", "1584:672")
_VEO_RATIOS = ("1280:720", "720:1280", "1080:1920", "1920:1080")
VIDEO_MODELS = {
    "gen4.5": VideoModel(("1280:720", "720:1280"), _GEN4_IMAGE_RATIOS, tuple(range(2, 11)), 5),
    "gen4_turbo": VideoModel((), _GEN4_IMAGE_RATIOS, tuple(range(2, 11)), 5),
    "veo3.1": VideoModel(_VEO_RATIOS, _VEO_RATIOS, (4, 6, 8), 8),
    "veo3.1_fast": VideoModel(_VEO_RATIOS, _VEO_RATIOS, (4, 6, 8), 8),
}
IMAGE_RATIOS = (
    "1024:1024",
    "1080:1080",
    "1168:880",
    "1360:768",
    "1440:1080",
    "1080:1440",
    "1808:768",
    "1920:1080",
    "1080:1920",
    "2112:912",
    "1280:720",
    "720:1280",
    "720:720",
    "960:720",
    "720:960",
    "1680:720",
)
IMAGE_MODELS = ("gen4_image", "gen4_image_turbo")
CANCELLED = {"CANCELLED", "CANCELED"}  # the SDK spells it one way, Runway's docs the other
# Runway has no per-minute limit (API-NOTES 4.4): its 429 is the daily or monthly cap, which
# only an operator (a higher tier) lifts. A message about credits is the balance running dry.
STATUS_ERRORS: dict[int, type[ProviderError]] = {429: QuotaExhaustedError}
ERROR_CODES: dict[str, type[ProviderError]] = {"insufficient_credits": QuotaExhaustedError}
QUOTA_PHRASES = ("enough credits", "insufficient credits", "out of credits")


def _describe(body: Any) -> tuple[list[str], str]:
    if isinstance(body, dict):
        message = str(body.get("error") or body.get("message") or "")
    else:
        message = str(body)[:300]
    quota = any(phrase in message.lower() for phrase in QUOTA_PHRASES)
    return ["insufficient_credits"] if quota else [], message


def _image_unit(model: str, ratio: str) -> str:
    if model == "gen4_image_turbo":
        return "gen4_image_turbo_images"
    # gen4_image costs 5 credits at 720p (a 720 side) and 8 at 1080p.
    return "gen4_image_720p_images" if "720" in ratio.split(":") else "gen4_image_1080p_images"


class RunwayProvider:
    """Runway's developer API: a submit returns a task id, `check` polls it, outputs expire.

    Settings: video `model` (gen4.5, gen4_turbo, veo3.1, veo3.1_fast), `ratio`, `duration`,
    `promptImage` (image to video), `seed`, `audio`, `negativePrompt`; image `model`
    (gen4_image, gen4_image_turbo), `ratio`, `referenceImages`, `seed`.
    """

    name = NAME
    content_types = frozenset({"video", "image"})

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
        api_version: str = API_VERSION,
    ):
        self.api_version = api_version
        self._http = HttpClient(
            NAME,
            base_url,
            timeout=timeout,
            session=session,
            describe=_describe,
            codes=ERROR_CODES,
            statuses=STATUS_ERRORS,
        )

    def __repr__(self) -> str:
        return f"RunwayProvider({self._http.base_url!r})"

    def _submission(self, content_type: str, prompt: str, settings: dict) -> tuple[str, dict, dict]:
        """(endpoint, JSON body, usage) for one request, validated."""
        if len(prompt.encode("utf-16-le")) > 2000:  # 1000 UTF-16 code units
            raise RejectedError("runway: the prompt is limited to 1000 characters", provider=NAME)
        s = Settings(NAME, settings)
        body: dict[str, Any] = {"promptText": prompt, "seed": s.integer("seed", None, 0, 2**32 - 1)}
        if content_type == "image":
            model = s.choice("model", "gen4_image", IMAGE_MODELS)
            references = settings.get("referenceImages")
            if references is not None and not (
                isinstance(references, list)
                and 1 <= len(references) <= 3
                and all(isinstance(r, dict) and isinstance(r.get("uri"), str) for r in references)
            ):
                raise s.reject("referenceImages", "a list of 1 to 3 {uri, tag} objects")
            if model == "gen4_image_turbo" and not references:
                raise s.reject("referenceImages", "given: gen4_image_turbo needs 1 to 3 of them")
            ratio = s.choice("ratio", "1024:1024", IMAGE_RATIOS)
            body.update(model=model, ratio=ratio, referenceImages=references)
            return "/v1/text_to_image", _compact(body), {_image_unit(model, ratio): 1}
        if content_type != "video":
            raise RejectedError(f"runway: cannot make {content_type}", provider=NAME)
        model = s.choice("model", "gen4.5", VIDEO_MODELS)
        spec = VIDEO_MODELS[model]
        image = s.text("promptImage", None, 7_000_000)  # a URL or a data URI of up to 5 MB
        ratios = spec.image_ratios if image else spec.text_ratios
        if not ratios:
            raise s.reject("promptImage", f"given: {model} only animates an image")
        duration = s.integer("duration", spec.default_duration, 1, 60)
        if duration not in spec.durations:
            raise s.reject("duration", f"one of {', '.join(map(str, spec.durations))} for {model}")
        body.update(
            model=model,
            ratio=s.choice("ratio", ratios[0], ratios),
            duration=duration,
            promptImage=image,
        )
        if model.startswith("veo"):
            body.update(
                audio=s.flag("audio", False), negativePrompt=s.text("negativePrompt", None, 1000)
            )
        endpoint = "/v1/image_to_video" if image else "/v1/text_to_video"
        return endpoint, _compact(body), {f"{model}_seconds": duration}

    def _headers(self, request: GenerationRequest) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {require_api_key(request, NAME)}",
            "X-Runway-Version": self.api_version,
        }

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        # Billing is per requested second (or image), so the estimate is also the charge.
        return self._submission(content_type, prompt, settings)[2]

    def start(self, request: GenerationRequest) -> Pending:
        endpoint, body, _ = self._submission(request.content_type, request.prompt, request.settings)
        response = self._http.send("POST", endpoint, headers=self._headers(request), json=body)
        task_id = self._http.json(response).get("id")
        if not isinstance(task_id, str) or not task_id:
            raise RejectedError("runway: the submit answer had no task id", provider=NAME)
        return Pending(task_id, 0.0, "PENDING")

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        response = self._http.send("GET", f"/v1/tasks/{remote_id}", headers=self._headers(request))
        task = self._http.json(response)
        status = str(task.get("status", ""))
        if status == "SUCCEEDED":
            # The output URLs are signed and expire: fetch at once; a failure re-polls later.
            outputs = task.get("output") or []
            if not outputs:
                raise RejectedError("runway: task succeeded without output", provider=NAME)
            download = self._http.download(outputs[0])
            usage = self._submission(request.content_type, request.prompt, request.settings)[2]
            video = request.content_type == "video"
            mime = download.headers.get("Content-Type", "").split(";")[0]
            if not mime.startswith("video/" if video else "image/"):
                mime = "video/mp4" if video else "image/png"
            return Output(
                download.content,
                mime,
                mime.split("/")[1].replace("jpeg", "jpg"),
                usage,
                {"task_id": remote_id, "outputs": len(outputs)},
            )
        if status == "FAILED":
            code = str(task.get("failureCode") or "")
            error = ContentFilteredError if code.startswith("SAFETY") else RejectedError
            raise error(f"runway: task failed: {task.get('failure') or code}"[:500], provider=NAME)
        if status in CANCELLED:
            raise RejectedError("runway: the task was cancelled", provider=NAME)
        # PENDING, THROTTLED (over our concurrency, queued by Runway), RUNNING, or a new word.
        progress = task.get("progress")
        return Pending(
            remote_id, float(progress) if isinstance(progress, int | float) else None, status
        )

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        # 404: already deleted, which is what cancel wants.
        self._http.send(
            "DELETE", f"/v1/tasks/{remote_id}", headers=self._headers(request), allow=(404,)
        )


def _compact(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}
