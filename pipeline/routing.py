"""Which provider serves a job: the one asked for, or the first configured and healthy one.

A provider is configured for a company when it needs no key (local, a ComfyUI with
URLs), when the platform has a key for it, or when the company set its own. The
order per content type is ROUTE_<TYPE> (e.g. ROUTE_IMAGE=stability,openai,local),
which is also the fallback order when a provider fails transiently or is cooling down.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from pipeline import circuits
from pipeline.errors import PipelineError, ValidationFailed
from pipeline.provider_errors import ProviderError
from pipeline.tables import provider_keys

log = logging.getLogger("pipeline.routing")

DEFAULT_ORDER = ("openai", "stability", "elevenlabs", "runway", "heygen", "comfyui", "local")


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


def choose(conn, registry, routes, company_id, *, content_type: str,
           requested: str | None) -> str:
    """The provider for a new job; a clear 400 when the request names an unusable one."""
    usable = configured_for(conn, registry, company_id)
    if requested:
        provider = registry.get(requested)
        if content_type not in provider.content_types:
            raise ValidationFailed(f"Provider '{requested}' does not generate {content_type}.",
                                   details={"field": "provider", "contentType": content_type})
        if requested not in usable:
            raise ValidationFailed(
                f"Provider '{requested}' has no API key: set the platform's "
                f"{requested.upper()}_API_KEY or this company's key at /v1/provider-keys.",
                details={"field": "provider"}, code="PROVIDER_NOT_CONFIGURED")
        return requested
    candidates = [name for name in order_for(routes, content_type)
                  if name in usable and content_type in registry.get(name).content_types]
    if not candidates:
        raise ValidationFailed(f"No configured provider generates {content_type}.",
                               details={"field": "contentType"})
    cooling = circuits.open_providers(conn)
    for name in candidates:
        if name not in cooling:
            return name
    raise ProviderUnavailable(
        f"Every provider for {content_type} is cooling down after repeated failures; "
        "try again shortly.", details={"providers": candidates})


def fallback(conn, registry, routes, job, *, hold_amount, prices) -> str | None:
    """The next provider after the job's current one that fits its hold, or None."""
    order = order_for(routes, job.content_type)
    if job.provider not in order:
        return None
    usable = configured_for(conn, registry, job.company_id)
    cooling = circuits.open_providers(conn)
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
