"""Which providers exist, which queue each runs on, and which one serves a request."""

from __future__ import annotations

from importlib.metadata import entry_points

from pipeline.errors import ValidationFailed
from providers.base import Provider
from providers.errors import RejectedError

ENTRY_POINT_GROUP = "content_pipeline.providers"

# Default order when a client names no provider: local first so a bare install works.
DEFAULT_ORDER = ("local", "openai", "stability", "elevenlabs", "runway", "heygen", "comfyui")


def queue_for(name: str) -> str:
    """Stable queue names: changing them would orphan messages already queued."""
    if name == "comfyui":
        return "gpu.comfyui"
    if name == "local":
        return "local"
    return f"saas.{name}"


class Registry:
    """Holds the configured providers by name."""

    def __init__(self, providers: dict[str, Provider] | None = None):
        self._providers: dict[str, Provider] = dict(providers or {})

    def add(self, provider: Provider) -> None:
        self._providers[provider.name] = provider

    def names(self) -> list[str]:
        return sorted(self._providers)

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise ValidationFailed(
                f"Unknown or unconfigured provider '{name}'.",
                details={"field": "provider", "available": self.names()},
            ) from None

    def resolve(self, content_type: str, requested: str | None) -> str:
        """The provider name for a request: the one asked for, or the first that fits."""
        if requested:
            provider = self.get(requested)
            if content_type not in provider.content_types:
                raise ValidationFailed(
                    f"Provider '{requested}' does not generate {content_type}.",
                    details={"field": "provider", "contentType": content_type},
                )
            return requested
        ordered = sorted(
            self._providers.values(),
            key=lambda p: DEFAULT_ORDER.index(p.name) if p.name in DEFAULT_ORDER else 99,
        )
        for provider in ordered:
            if content_type in provider.content_types:
                return provider.name
        raise ValidationFailed(f"No configured provider generates {content_type}.",
                               details={"field": "contentType"})

    def estimate_usage(self, name: str, content_type: str, prompt: str, settings: dict) -> dict:
        """The provider's upper bound on usage; its refusal of the settings is a 400."""
        try:
            return self.get(name).estimate_usage(content_type, prompt, settings)
        except RejectedError as exc:
            raise ValidationFailed(exc.message, details={"field": "settings"}) from None

    queue_for = staticmethod(queue_for)


def build_registry(settings) -> Registry:
    """Every provider this deployment can use: built-in, configured SaaS, and plug-ins."""
    from providers.local import LocalProvider

    registry = Registry({"local": LocalProvider()})
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        factory = entry.load()
        registry.add(factory(settings))
    return registry
