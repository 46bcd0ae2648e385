"""Which providers exist, how each is built from the settings, and which queue it runs on."""

from __future__ import annotations

import uuid
from importlib.metadata import entry_points

from pipeline.errors import ValidationFailed
from pipeline.provider import Provider
from pipeline.provider_errors import RejectedError

ENTRY_POINT_GROUP = "content_pipeline.providers"
# Providers that only work with an API key (the platform's or the company's own).
KEYED = frozenset({"openai", "stability", "elevenlabs", "runway", "heygen"})


def queue_for(name: str) -> str:
    """Stable queue names: changing them would orphan messages already queued."""
    if name == "comfyui":
        return "gpu.comfyui"
    if name == "local":
        return "local"
    return f"saas.{name}"


class Registry:
    """The providers this deployment knows, by name, and which need no company key."""

    def __init__(self, providers: dict[str, Provider] | None = None,
                 platform_keys: frozenset[str] = frozenset()):
        self._providers: dict[str, Provider] = dict(providers or {})
        self._platform_keys = set(platform_keys)

    def add(self, provider: Provider) -> None:
        self._providers[provider.name] = provider

    def names(self) -> list[str]:
        return sorted(self._providers)

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise ValidationFailed(
                f"Unknown provider '{name}'.",
                details={"field": "provider", "available": self.names()},
            ) from None

    def platform_configured(self) -> set[str]:
        """Usable by every company: keyless providers and those with a platform key."""
        return {name for name in self._providers
                if name not in KEYED or name in self._platform_keys}

    def estimate_usage(self, name: str, content_type: str, prompt: str, settings: dict) -> dict:
        """The provider's upper bound on usage; its refusal of the settings is a 400."""
        try:
            return self.get(name).estimate_usage(content_type, prompt, settings)
        except RejectedError as exc:
            raise ValidationFailed(exc.message, details={"field": "settings"}) from None

    queue_for = staticmethod(queue_for)


def build_registry(settings) -> Registry:
    """Every provider this deployment can use: built-in, SaaS, ComfyUI, and plug-ins.

    SaaS adapters are always built (a company may bring its own key); base URLs come
    from <NAME>_BASE_URL, so any compatible server (an OpenAI-compatible vLLM or
    Ollama, a fake in tests) can stand in.
    """
    from providers.elevenlabs import ElevenLabsProvider
    from providers.heygen import HeyGenProvider
    from providers.local import LocalProvider
    from providers.openai import OpenAIProvider
    from providers.runway import RunwayProvider
    from providers.stability import StabilityProvider

    env = settings.provider_env
    providers: dict[str, Provider] = {"local": LocalProvider()}
    for name, cls in (("openai", OpenAIProvider), ("stability", StabilityProvider),
                      ("elevenlabs", ElevenLabsProvider), ("runway", RunwayProvider),
                      ("heygen", HeyGenProvider)):
        base_url = env.get(f"{name.upper()}_BASE_URL")
        providers[name] = cls(base_url=base_url) if base_url else cls()
    comfy_urls = [u.strip() for u in env.get("COMFY_WORKER_URL", "").split(",") if u.strip()]
    if comfy_urls:
        from providers.comfyui import ComfyUIProvider

        # ComfyUI sends progress only to the socket of the client id that submitted,
        # and one id holds one socket: each process gets its own.
        providers["comfyui"] = ComfyUIProvider(comfy_urls,
                                               client_id=f"content-pipeline-{uuid.uuid4().hex}")
    registry = Registry(providers, frozenset(n for n in KEYED if env.get(f"{n.upper()}_API_KEY")))
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        registry.add(entry.load()(settings))
    return registry
