"""A company's spend per UTC day, by provider and content type, from `api_usage`.

`api_usage` holds one row per finished job with the cost it was charged (0 when it
failed or was cancelled), written with the outcome itself (pipeline/usage.py), so these
sums agree with the ledger's debits without reading the ledger. The grouping is done
by the database: a day of many jobs is one row here.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from pipeline.tables import api_usage

MAX_DAYS = 366


def spend_per_day(conn, company_id, *, days: int, today: date | None = None) -> dict:
    """The last `days` UTC days up to and including `today`: one entry per day, provider
    and content type that was charged something, oldest first, and the window's total."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    day = _day_of(conn, api_usage.c.created_at).label("day")
    cost = func.sum(api_usage.c.cost).label("cost")
    rows = conn.execute(
        select(day, api_usage.c.provider, api_usage.c.content_type, cost)
        .where(api_usage.c.company_id == company_id,
               api_usage.c.created_at >= datetime.combine(first, time.min, tzinfo=UTC),
               api_usage.c.cost > 0)
        .group_by(day, api_usage.c.provider, api_usage.c.content_type)
        .order_by(day, api_usage.c.provider, api_usage.c.content_type)
    ).all()
    entries = [{"day": str(r.day)[:10], "provider": r.provider,
                "contentType": r.content_type, "cost": str(r.cost)} for r in rows]
    total = sum((r.cost for r in rows), Decimal("0.000000"))
    return {"from": first.isoformat(), "to": today.isoformat(), "days": days,
            "total": str(total), "entries": entries}


def _day_of(conn, column):
    """The UTC calendar day of a timestamp, as text: PostgreSQL converts the instant to UTC;
    SQLite stores UTC text already (`YYYY-MM-DD HH:MM:SS...`), its first ten characters."""
    if conn.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.substr(column, 1, 10)
