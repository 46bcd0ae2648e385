"""Retention: rows of `logs`, `metrics` and `api_usage` past their age are deleted in batches.

Each batch is its own short transaction of at most `batch` rows, so pruning a backlog never
holds locks (or SQLite's one write lock) for long, and a run stops after `max_seconds` and
leaves the rest to the next one.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from pipeline.tables import api_usage, logs, metrics

# Each table and the column its age is read from.
TABLES = {"logs": (logs, logs.c.timestamp), "metrics": (metrics, metrics.c.timestamp),
          "api_usage": (api_usage, api_usage.c.created_at)}


def cutoffs(settings, now: datetime) -> dict[str, datetime]:
    """Rows older than these go; a retention of 0 days keeps a table's rows forever."""
    days = {"logs": settings.logs_retention_days, "metrics": settings.metrics_retention_days,
            "api_usage": settings.api_usage_retention_days}
    return {name: now - timedelta(days=n) for name, n in days.items() if n > 0}


def prune(engine, older_than: dict[str, datetime], *, batch: int = 5000,
          max_seconds: float = 240.0) -> dict[str, int]:
    """Delete the rows older than each table's cutoff; {table: rows deleted}."""
    stop_at = time.monotonic() + max_seconds
    counts = {}
    for name, cutoff in older_than.items():
        table, age = TABLES[name]
        counts[name] = 0
        while time.monotonic() < stop_at:
            # SKIP LOCKED (PostgreSQL; SQLite has one writer anyway): two overlapping runs
            # take different rows instead of waiting on each other.
            oldest = (select(table.c.id).where(age < cutoff).limit(batch)
                      .with_for_update(skip_locked=True))
            with engine.begin() as conn:
                deleted = conn.execute(delete(table).where(table.c.id.in_(oldest))).rowcount
            counts[name] += deleted
            if deleted < batch:
                break
    return counts
