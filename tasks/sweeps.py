"""Beat-driven maintenance: one sweep task on the maintenance queue."""

from __future__ import annotations

import logging

from pipeline import audit, sweeper
from pipeline.db import new_id, utcnow
from pipeline.tables import metrics
from tasks import names

log = logging.getLogger("pipeline.sweeper")


def register(app) -> None:
    @app.task(name=names.SWEEP, shared=False, ignore_result=True, soft_time_limit=120,
              time_limit=150, acks_late=False)
    def sweep():
        """Every sweep once; each logs what it did and why (pipeline.sweeper), and the
        counts per sweep are logged as one `sweep: {...}` line whenever any is non-zero."""
        # acks_late off: a lost sweep is simply run again by beat a few seconds later.
        from tasks.app import runtime_of

        return sweeper.sweep(runtime_of(app))

    @app.task(name=names.LEDGER_AUDIT, shared=False, ignore_result=True, soft_time_limit=240,
              time_limit=270, acks_late=False)
    def ledger_audit():
        """Check every ledger invariant; the result is kept as metrics rows for /metrics."""
        from tasks.app import runtime_of

        engine = runtime_of(app).engine
        findings = audit.audit(engine)
        counts = audit.summary(findings)
        at = utcnow()  # one timestamp for the whole run: /metrics reads the latest run
        with engine.begin() as conn:
            conn.execute(metrics.insert(), [
                {"id": new_id(), "name": "ledger_audit_findings", "value": count,
                 "labels": {"check": check}, "timestamp": at}
                for check, count in counts.items()])
        for finding in findings[:50]:
            log.error("ledger audit: %s %s: %s", finding.check, finding.subject,
                      finding.message)
        return counts
