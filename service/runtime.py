"""The one place that wires concrete pieces together from the settings.

API processes, workers and the CLI each build one Runtime; tests build theirs with
their own settings (a test database, a key prefix, fake provider URLs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine

from pipeline import jobevents
from pipeline.config import Settings
from pipeline.db import make_engine
from pipeline.storage import Storage, open_storage


class Publisher(Protocol):
    """Hands a committed job's chain to the broker; raises on failure, never blocks long.
    `reserved`: the job's hold is taken, its chain starts at generate."""

    def publish(self, job_id, queue: str, *, reserved: bool = False) -> None: ...


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    storage: Storage
    registry: Any
    publisher: Publisher | None = None
    extras: dict = field(default_factory=dict)


def build_runtime(settings: Settings, *, publisher: Publisher | None = None,
                  registry=None, storage: Storage | None = None) -> Runtime:
    from providers.registry import build_registry
    from service import announce

    runtime = Runtime(
        settings=settings,
        engine=make_engine(settings.database_url),
        storage=storage or open_storage(settings),
        registry=registry or build_registry(settings),
        publisher=publisher,
    )
    # The job changes this process makes wake the API's live listeners (SSE, Prefer: wait).
    jobevents.install(announce.announcer_for(settings, runtime.engine))
    return runtime
