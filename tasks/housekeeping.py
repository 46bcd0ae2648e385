"""Beat-driven housekeeping: the logs, metrics and api_usage rows past their retention go."""

from __future__ import annotations

import logging

from pipeline import retention
from pipeline.db import utcnow
from tasks import names

log = logging.getLogger("pipeline.housekeeping")

# A run stops starting batches after this, well inside its soft time limit.
RUN_SECONDS = 240


def register(app) -> None:
    @app.task(name=names.PRUNE, shared=False, ignore_result=True,
              soft_time_limit=RUN_SECONDS + 60, time_limit=RUN_SECONDS + 90, acks_late=False)
    def prune():
        # acks_late off: a lost run is simply made up by the next one.
        from tasks.app import runtime_of

        rt = runtime_of(app)
        counts = retention.prune(rt.engine, retention.cutoffs(rt.settings, utcnow()),
                                 batch=rt.settings.prune_batch_size, max_seconds=RUN_SECONDS)
        if any(counts.values()):
            log.info("pruned rows past retention: %s", counts)
        return counts
