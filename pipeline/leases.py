"""Leases on provider instances: at most N prompts per ComfyUI instance across every worker.

A row per instance in `provider_leases`. Taking one is a conditional UPDATE (free, expired,
or already this job's), so two GPU slots on two machines can never pick the same idle
instance the way a read of each instance's queue let them. The holder's heartbeat renews
the lease; a worker that dies stops renewing it, and it is free again once it expires.

An instance has `per_instance` slots (COMFYUI_PROMPTS_PER_INSTANCE): slot 1 is leased under
the instance's URL itself, slot k under "<url>#slot<k>". ComfyUI runs one prompt at a time,
so a second slot is a prompt queued behind the running one: the GPU starts it the moment the
first ends, while that job's worker downloads and stores its output.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from pipeline.db import insert_ignore, utcnow
from pipeline.tables import provider_leases

SLOT = "#slot"


def slots(instances: list[str], per_instance: int) -> list[str]:
    """The lease resources of `instances`: every instance's first slot before any second,
    so jobs spread over idle instances before queueing on a busy one."""
    return [url if k == 1 else f"{url}{SLOT}{k}"
            for k in range(1, max(per_instance, 1) + 1) for url in instances]


def instance_of(resource: str) -> str:
    """The instance a lease resource (a slot) belongs to."""
    url, found, _ = resource.rpartition(SLOT)
    return url if found else resource


def acquire(engine, resources: list[str], job_id, *, ttl_seconds: float) -> str | None:
    """The first of `resources` that is free (or already this job's), now leased; or None."""
    if not resources:
        return None
    now = utcnow()
    with engine.begin() as conn:
        rows = conn.execute(select(provider_leases.c.resource, provider_leases.c.job_id)
                            .where(provider_leases.c.resource.in_(resources))).all()
        for resource in set(resources) - {row.resource for row in rows}:
            insert_ignore(conn, provider_leases, {"resource": resource}, ["resource"])
        # This job's own lease first (a retry of a job that holds one), then any free one.
        own = {row.resource for row in rows if row.job_id == job_id}
        ordered = sorted(resources, key=lambda r: r not in own)
        for resource in ordered:
            taken = conn.execute(
                update(provider_leases)
                .where(
                    provider_leases.c.resource == resource,
                    or_(
                        provider_leases.c.job_id.is_(None),
                        provider_leases.c.job_id == job_id,
                        provider_leases.c.expires_at < now,
                    ),
                )
                .values(job_id=job_id, expires_at=now + timedelta(seconds=ttl_seconds),
                        updated_at=now)
            ).rowcount
            if taken:
                return resource
    return None


def renew(engine, resource: str, job_id, *, ttl_seconds: float) -> bool:
    """Extend this job's lease; False when it is no longer this job's."""
    now = utcnow()
    with engine.begin() as conn:
        return bool(conn.execute(
            update(provider_leases)
            .where(provider_leases.c.resource == resource, provider_leases.c.job_id == job_id)
            .values(expires_at=now + timedelta(seconds=ttl_seconds), updated_at=now)
        ).rowcount)


def release(engine, resource: str, job_id) -> None:
    """Give the instance back (only if this job still holds it)."""
    with engine.begin() as conn:
        conn.execute(
            update(provider_leases)
            .where(and_(provider_leases.c.resource == resource,
                        provider_leases.c.job_id == job_id))
            .values(job_id=None, expires_at=None, updated_at=utcnow())
        )


def holders(conn, resources: list[str]) -> dict[str, object]:
    """resource -> job id, for the leases among `resources` that are held and unexpired."""
    now = utcnow()
    rows = conn.execute(
        select(provider_leases.c.resource, provider_leases.c.job_id)
        .where(provider_leases.c.resource.in_(resources),
               provider_leases.c.job_id.is_not(None), provider_leases.c.expires_at >= now)
    ).all()
    return {row.resource: row.job_id for row in rows}
