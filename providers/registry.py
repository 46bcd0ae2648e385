"""Which providers exist, how each is built from the settings, and which queue it runs on."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from pipeline import catalogue
from pipeline.errors import ValidationFailed
from pipeline.provider import Provider
from pipeline.provider_errors import RejectedError

ENTRY_POINT_GROUP = "content_pipeline.providers"
KEYED = catalogue.KEYED
queue_for = catalogue.queue_for


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

    def instances(self, name: str) -> list[str]:
        """The instances of a multi-instance provider (ComfyUI's URLs); [] for the others."""
        provider = self._providers.get(name)
        return list(provider.instances()) if hasattr(provider, "instances") else []

    def estimate_usage(self, name: str, content_type: str, prompt: str, settings: dict) -> dict:
        """The provider's upper bound on usage; its refusal of the settings is a 400."""
        try:
            return self.get(name).estimate_usage(content_type, prompt, settings)
        except RejectedError as exc:
            raise ValidationFailed(exc.message, details={"field": "settings"}) from None

    queue_for = staticmethod(queue_for)


def _factory(path: str):
    module, _, attribute = path.partition(":")
    return getattr(import_module(module), attribute)


def build_registry(settings) -> Registry:
    """Every provider this deployment can use: the catalogue's built-ins, and plug-ins.

    SaaS adapters are always built (a company may bring its own key); base URLs come
    from <NAME>_BASE_URL, so any compatible server (an OpenAI-compatible vLLM or
    Ollama, a fake in tests) can stand in. ComfyUI is built when COMFY_WORKER_URL names
    at least one instance.
    """
    env = settings.provider_env
    providers: dict[str, Provider] = {}
    comfy_urls = [u.strip() for u in env.get("COMFY_WORKER_URL", "").split(",") if u.strip()]
    for info in catalogue.CATALOGUE:
        if info.name == "local":
            providers[info.name] = _factory(info.factory)()
        elif info.name == "comfyui":
            if comfy_urls:
                providers[info.name] = _factory(info.factory)(comfy_urls)
        else:
            base_url = env.get(f"{info.name.upper()}_BASE_URL")
            cls = _factory(info.factory)
            providers[info.name] = cls(base_url=base_url) if base_url else cls()
    registry = Registry(providers, frozenset(n for n in KEYED if env.get(f"{n.upper()}_API_KEY")))
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        registry.add(entry.load()(settings))
    return registry
