"""Which provider serves a job: the one asked for, or the first configured and healthy one.

A provider is configured for a company when it needs no key (local, a ComfyUI with
URLs), when the platform has a key for it, or when the company set its own. The
order per content type is ROUTE_<TYPE> (e.g. ROUTE_IMAGE=stability,openai,local),
which is also the fallback order when a provider fails transiently or is cooling down.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from pipeline import catalogue, circuits
from pipeline.errors import PipelineError, ValidationFailed
from pipeline.provider_errors import ProviderError
from pipeline.tables import provider_keys

log = logging.getLogger("pipeline.routing")

DEFAULT_ORDER = catalogue.DEFAULT_ORDER


class ProviderUnavailable(PipelineError):
    status = 503
    code = "PROVIDER_UNAVAILABLE"


def order_for(routes: dict[str, str], content_type: str) -> tuple[str, ...]:
    """`routes` holds ROUTE_<TYPE> values (settings.provider_env works as it is)."""
    configured = routes.get(f"ROUTE_{content_type.upper()}", "")
    names = tuple(n.strip() for n in configured.split(",") if n.strip())
    return names or DEFAULT_ORDER


def configured_for(conn, registry, company_id) -> set[str]:
    own = set(conn.execute(
        select(provider_keys.c.provider).where(provider_keys.c.company_id == company_id)
    ).scalars())
    return registry.platform_configured() | (own & set(registry.names()))


def configured_among(conn, registry, company_id, names) -> set[str]:
    """Which of `names` are configured for the company: its own keys are read only when
    one of them is not usable by every company already (as keyless `local` is)."""
    platform = registry.platform_configured()
    if set(names) <= platform:
        return set(names)
    return set(names) & configured_for(conn, registry, company_id)


def choose(conn, registry, routes, company_id, *, content_type: str,
           requested: str | None) -> str:
    """The provider for a new job; a clear 400 when the request names an unusable one."""
    if requested:
        if requested in catalogue.BY_NAME and requested not in registry.names():
            # A provider we know, left out of this deployment (ComfyUI without its URLs).
            raise ValidationFailed(
                f"Provider '{requested}' is not configured on this deployment"
                + (": set COMFY_WORKER_URL." if requested == "comfyui" else "."),
                details={"field": "provider"}, code="PROVIDER_NOT_CONFIGURED")
        provider = registry.get(requested)
        if content_type not in provider.content_types:
            raise ValidationFailed(f"Provider '{requested}' does not generate {content_type}.",
                                   details={"field": "provider", "contentType": content_type})
        if requested not in configured_among(conn, registry, company_id, {requested}):
            raise ValidationFailed(
                f"Provider '{requested}' has no API key: set the platform's "
                f"{requested.upper()}_API_KEY or this company's key at /v1/provider-keys.",
                details={"field": "provider"}, code="PROVIDER_NOT_CONFIGURED")
        return requested
    order = [name for name in order_for(routes, content_type)
             if name in registry.names() and content_type in registry.get(name).content_types]
    usable = configured_among(conn, registry, company_id, order)
    candidates = [name for name in order if name in usable]
    if not candidates:
        raise ValidationFailed(f"No configured provider generates {content_type}.",
                               details={"field": "contentType"})
    cooling = cooling_providers(conn, registry)
    for name in candidates:
        if name not in cooling:
            return name
    raise ProviderUnavailable(
        f"Every provider for {content_type} is cooling down after repeated failures; "
        "try again shortly.", details={"providers": candidates})


# Settings every provider of a content type reads the same way. A job carrying any other
# setting (a ComfyUI workflow, a voice id, a model) meant that provider: it never falls back.
PORTABLE_SETTINGS = frozenset({"width", "height", "size", "maxTokens", "duration"})


def explicit_route(routes: dict[str, str], content_type: str) -> bool:
    return bool(routes.get(f"ROUTE_{content_type.upper()}", "").strip())


def fallback(conn, registry, routes, job, *, hold_amount, prices) -> str | None:
    """The next provider after the job's current one that may take it, or None.

    Never for a job that named its provider or carries provider-specific settings; never
    to the `local` development renderer unless ROUTE_<TYPE> names it; only a provider that
    accepts the job's settings and whose price fits the hold.
    """
    if job.provider_pinned or set(job.settings or {}) - PORTABLE_SETTINGS:
        return None
    order = order_for(routes, job.content_type)
    if not explicit_route(routes, job.content_type):
        order = tuple(name for name in order if name != "local")
    if job.provider not in order:
        return None
    usable = configured_for(conn, registry, job.company_id)
    cooling = cooling_providers(conn, registry)
    for name in order[order.index(job.provider) + 1:]:
        if name not in usable or name in cooling:
            continue
        provider = registry.get(name)
        if job.content_type not in provider.content_types:
            continue
        try:
            usage = provider.estimate_usage(job.content_type, job.prompt, dict(job.settings))
            cost = prices.cost(name, job.content_type, usage)
        except (PipelineError, ProviderError) as exc:
            log.info("fallback: %s cannot take job %s (%s)", name, job.id, exc)
            continue
        if cost <= hold_amount:
            return name
    return None


def cooling_providers(conn, registry) -> set[str]:
    """Providers whose circuit is open; a multi-instance one when every instance's is."""
    return cooling_among(circuits.open_providers(conn), registry)


def cooling_among(open_keys, registry) -> set[str]:
    """cooling_providers for circuits already read (`open_keys`, as open_providers says)."""
    cooling = {key for key in open_keys if "@" not in key}
    for name in registry.names():
        instances = registry.instances(name)
        if instances and all(circuits.instance_key(name, i) in open_keys for i in instances):
            cooling.add(name)
    return cooling
