"""The built-in providers in one table: name, queue, whether they need a key, how they run.

Everything that used to keep its own list (the queues, the keyed providers, the default
route, the registry's constructors, the slot-holding GPU providers) reads it from here.
A plug-in provider (entry point `content_pipeline.providers`) is not listed: it runs on
`saas.<name>` with the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderInfo:
    name: str
    queue: str
    # "module:Class" of the adapter, built by providers.registry (the core never imports it).
    factory: str
    keyed: bool = False  # needs an API key: the platform's or the company's own
    # Polled inside the generate task, keeping the worker slot: on the gpu queue one slot
    # stands for one GPU. Others hand the slot back between polls.
    holds_slot: bool = False
    # How long the provider's remote work may take before the job fails and it is
    # cancelled (<NAME>_DEADLINE_SECONDS overrides). Real video renders take minutes to an
    # hour; synchronous calls are bounded by their HTTP timeouts instead.
    deadline_seconds: int = 3600
    # Its generate task also stores and settles the job (the finish step's work) and drops
    # the chain's finish step: the provider runs inside the worker's own process and its
    # whole call costs less than handing the job to the pipeline queue. A provider node's
    # threads and a GPU slot are left for provider calls, so theirs stays a step.
    finishes_in_place: bool = False


CATALOGUE: tuple[ProviderInfo, ...] = (
    ProviderInfo("openai", "saas.openai", "providers.openai:OpenAIProvider", keyed=True),
    ProviderInfo("stability", "saas.stability", "providers.stability:StabilityProvider",
                 keyed=True),
    ProviderInfo("elevenlabs", "saas.elevenlabs", "providers.elevenlabs:ElevenLabsProvider",
                 keyed=True),
    ProviderInfo("runway", "saas.runway", "providers.runway:RunwayProvider", keyed=True),
    ProviderInfo("heygen", "saas.heygen", "providers.heygen:HeyGenProvider", keyed=True),
    ProviderInfo("comfyui", "gpu.comfyui", "providers.comfyui:ComfyUIProvider",
                 holds_slot=True, deadline_seconds=1800),
    ProviderInfo("local", "local", "providers.local:LocalProvider", deadline_seconds=600,
                 finishes_in_place=True),
)
BY_NAME = {info.name: info for info in CATALOGUE}

# The routing order when ROUTE_<TYPE> is not set: paid providers first, local last.
DEFAULT_ORDER = tuple(info.name for info in CATALOGUE)
KEYED = frozenset(info.name for info in CATALOGUE if info.keyed)
SLOT_HOLDING = frozenset(info.name for info in CATALOGUE if info.holds_slot)
SAAS_QUEUES = tuple(info.queue for info in CATALOGUE if info.queue.startswith("saas."))
GPU_QUEUES = tuple(info.queue for info in CATALOGUE if info.queue.startswith("gpu."))


def info_for(name: str) -> ProviderInfo:
    """The catalogue entry, or the defaults of a plug-in provider."""
    return BY_NAME.get(name) or ProviderInfo(name, f"saas.{name}", "")


def queue_for(name: str) -> str:
    """Stable queue names: changing them would orphan messages already queued."""
    return info_for(name).queue


def deadline_for(name: str, provider_env: dict[str, str]) -> int:
    """Seconds the provider's remote work may take: <NAME>_DEADLINE_SECONDS or the default."""
    configured = provider_env.get(f"{name.upper()}_DEADLINE_SECONDS", "")
    return int(configured) if configured.strip().isdigit() else info_for(name).deadline_seconds
