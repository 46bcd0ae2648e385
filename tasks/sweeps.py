"""Beat-driven maintenance: one sweep task on the maintenance queue."""

from __future__ import annotations

import logging

from pipeline import sweeper
from tasks import names

log = logging.getLogger("pipeline.sweeper")


def register(app) -> None:
    @app.task(name=names.SWEEP, shared=False, ignore_result=True, soft_time_limit=120,
              time_limit=150, acks_late=False)
    def sweep():
        # acks_late off: a lost sweep is simply run again by beat a few seconds later.
        from tasks.app import runtime_of

        counts = sweeper.sweep(runtime_of(app))
        if any(counts.values()):
            log.info("sweep: %s", counts)
        return counts
