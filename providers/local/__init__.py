"""The built-in `local` provider: real development files rendered on this machine."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import ProviderError
from providers.local import audio, image, text, video
from providers.local.settings import PROVIDER_NAME, reject

__all__ = ["LocalProvider"]

_RENDERERS: dict[str, ModuleType] = {
    "text": text,
    "image": image,
    "audio": audio,
    "video": video,
}


class LocalProvider:
    """Text, images, speech and video made locally, with no key and no network.

    Every output is development material (placeholder text, a labelled gradient, eSpeak NG
    speech, a slideshow-like MP4) and says so in its metadata. The provider is synchronous:
    `start` renders and returns an Output in the calling thread, so `check` has nothing to
    poll and `cancel` has nothing to stop. Speech goes through one process-wide eSpeak NG
    engine behind a lock, so concurrent audio and video jobs in one process take turns for
    the (short) synthesis step; everything else runs in parallel.

    Usage units: text {"tokens"}, image {"megapixels"}, audio {"characters"},
    video {"seconds"}. Settings are validated by both `estimate_usage` and `start`;
    keys this provider does not know are ignored.
    """

    name = PROVIDER_NAME
    content_types = frozenset(_RENDERERS)

    def __init__(self, *, video_timeout_s: float = video.DEFAULT_TIMEOUT_S) -> None:
        self._video_timeout_s = video_timeout_s

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        """The most `start` will report for this request; equal to it except for text."""
        return _renderer(content_type).estimate_usage(_clean(prompt), _checked(settings))

    def start(self, request: GenerationRequest) -> Output | Pending:
        """Render the output now; raises RejectedError for bad settings."""
        renderer = _renderer(request.content_type)
        settings = _checked(request.settings)
        prompt = _clean(request.prompt)
        if renderer is video:
            return video.render(prompt, settings, timeout_s=self._video_timeout_s)
        return renderer.render(prompt, settings)

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        """Never needed: `start` never returns Pending, so there is no remote job to poll."""
        raise ProviderError(
            "the local provider is synchronous and has no pending jobs to check",
            provider=PROVIDER_NAME,
        )

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        """Nothing to do: local work runs inside `start` and is over when it returns."""


def _renderer(content_type: str) -> ModuleType:
    renderer = _RENDERERS.get(content_type)
    if renderer is None:
        raise reject(f"the local provider does not make {content_type!r} content")
    return renderer


def _clean(prompt: str) -> str:
    """The prompt with lone surrogates (valid in JSON, not in UTF-8) replaced, length kept."""
    return prompt.encode("utf-8", "replace").decode("utf-8")


def _checked(settings: Any) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise reject("settings must be an object")
    return settings
