"""The interface every provider implements, and the values that cross it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

CONTENT_TYPES = ("text", "image", "audio", "video")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything an adapter needs for one job; built by the worker from the job row.

    `credentials` holds the secret for SaaS providers (the company's own key or the
    platform's). It is never logged, stored on the job or sent through the broker.
    """

    job_id: str
    content_type: str
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    # For providers with several instances (ComfyUI): the one this job holds a lease on.
    # A fresh start submits there; None means the adapter may choose.
    instance: str | None = None


@dataclass(frozen=True)
class OutputFile:
    """One more file of a generation that made several (a batch, a graph with two outputs)."""

    data: bytes = field(repr=False)
    mime_type: str
    extension: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Output:
    """A finished generation: the bytes, what they are, and what was consumed.

    `usage` is in the price table's units for this provider (for example
    {"tokens": 812}, {"characters": 240}, {"seconds": 5}, {"images": 1});
    pricing turns it into credits, and it covers every file, `more` included.
    `data` is the main file (the job's result); `more` holds the others, stored beside it.
    """

    data: bytes = field(repr=False)
    mime_type: str
    extension: str
    usage: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    more: tuple[OutputFile, ...] = ()


@dataclass(frozen=True)
class Pending:
    """An asynchronous provider accepted the job and is still working on it."""

    remote_id: str
    progress: float | None = None  # 0..1 where the provider reports it
    status: str = ""


class Provider(Protocol):
    """One vendor (or the built-in local renderers) seen from the pipeline.

    Synchronous providers return an Output from `start`. Asynchronous ones return
    Pending; the worker persists `remote_id` at once and later calls `check` until it
    returns an Output. Every method raises only `pipeline.provider_errors.ProviderError`
    subclasses for vendor trouble.
    """

    name: str
    content_types: frozenset[str]

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        """The most this request can consume, in price-table units (the hold is priced from it)."""
        ...

    def start(self, request: GenerationRequest) -> Output | Pending: ...

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending: ...

    def cancel(self, request: GenerationRequest, remote_id: str) -> None: ...


class MultiInstance(Protocol):
    """A provider spread over instances of its own (ComfyUI, one per GPU).

    The worker leases one instance per job (one running prompt per instance across every
    worker), passes it as `GenerationRequest.instance`, and keeps a circuit breaker per
    instance. `instance_of` says which instance a saved remote id lives on.
    """

    def instances(self) -> list[str]: ...

    def instance_of(self, remote_id: str) -> str: ...
