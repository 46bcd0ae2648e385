"""Per-provider circuit breakers, shared by every worker through the database.

After `threshold` consecutive transient failures a provider is skipped for `cooldown`
seconds; the first success closes it again. A multi-instance provider (ComfyUI) has one
circuit per instance ("comfyui@<url>"): one restarting instance cools only itself, and the
provider counts as cooling only when every instance does. Routing avoids open circuits, and the
generate step falls back to the next provider when the one it has is open.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import bindparam, func, select, update

from pipeline.db import autocommit, aware_utc, insert_ignore, utcnow
from pipeline.tables import provider_circuits

THRESHOLD = 5
COOLDOWN_SECONDS = 30


def instance_key(provider: str, instance: str) -> str:
    """The circuit of one instance of a multi-instance provider (a ComfyUI server)."""
    return f"{provider}@{instance}"


# Built once: both run on every generate delivery (RESET inside the statement that saves
# the output, on PostgreSQL: lifecycle.save_output).
_OPEN = select(provider_circuits.c.provider).where(
    provider_circuits.c.opened_until > bindparam("now"))
RESET = (update(provider_circuits)
          .where(provider_circuits.c.provider == bindparam("circuit"),
                 provider_circuits.c.consecutive_failures > 0)
          .values(consecutive_failures=0, updated_at=bindparam("now")))


def open_providers(conn) -> set[str]:
    return set(conn.execute(_OPEN, {"now": utcnow()}).scalars())


def closes_in(engine, keys: list[str]) -> float:
    """Seconds until the first of these circuits closes again; 0 when one is not open."""
    now = utcnow()
    with autocommit(engine) as conn:
        row = conn.execute(
            select(func.count(), func.min(provider_circuits.c.opened_until))
            .where(provider_circuits.c.provider.in_(keys),
                   provider_circuits.c.opened_until > now)).one()
    if row[0] < len(set(keys)):
        return 0.0
    return max((aware_utc(row[1]) - now).total_seconds(), 0.0)


def record_failure(engine, provider: str, *, threshold: int = THRESHOLD,
                   cooldown: int = COOLDOWN_SECONDS) -> bool:
    """Count a transient failure; True when this one opened the circuit."""
    now = utcnow()
    with engine.begin() as conn:
        insert_ignore(conn, provider_circuits, {"provider": provider}, ["provider"])
        row = conn.execute(
            update(provider_circuits)
            .where(provider_circuits.c.provider == provider)
            .values(consecutive_failures=provider_circuits.c.consecutive_failures + 1,
                    updated_at=now)
            .returning(provider_circuits.c.consecutive_failures,
                       provider_circuits.c.opened_until)
        ).one()
        if row.consecutive_failures >= threshold and not (
            row.opened_until and aware_utc(row.opened_until) > now
        ):
            conn.execute(
                update(provider_circuits)
                .where(provider_circuits.c.provider == provider)
                .values(opened_until=now + timedelta(seconds=cooldown),
                        consecutive_failures=0)
            )
            return True
    return False


def record_success(engine, provider: str) -> None:
    # One statement, and usually a write to nothing: the count is only reset when it
    # is not zero already.
    with autocommit(engine) as conn:
        conn.execute(RESET, {"circuit": provider, "now": utcnow()})
