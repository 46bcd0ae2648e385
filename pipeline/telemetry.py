"""What the core reports for metrics: a port, so the core never imports an exporter.

The use cases call these functions where an event happens (a job submitted, settled or
failed, credits moved, a provider asked); the process that exports metrics (an API
process, a worker) installs a `Recorder` once at start (`install`), as a process
configures logging. Until then every event goes nowhere, which is what the CLI and the
unit tests want.

Events are reported after their transaction commits, so a rolled-back step counts
nothing. Recording never fails a use case: a broken recorder is logged and skipped,
since losing a sample is better than failing a job over it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from decimal import Decimal

from pipeline.db import aware_utc, utcnow
from pipeline.errors import PipelineError
from pipeline.provider import Pending
from pipeline.provider_errors import ProviderError, TransientError

log = logging.getLogger("pipeline.telemetry")


class Recorder:
    """The events, each a no-op here; an exporter overrides them (service/metrics.py)."""

    def job_submitted(self, provider: str, content_type: str) -> None: ...

    def job_finished(self, provider: str, content_type: str, status: str, code: str | None,
                     seconds: float) -> None: ...

    def job_started(self, queue: str, waited_seconds: float) -> None: ...

    def provider_request(self, provider: str, operation: str, outcome: str, code: str,
                         seconds: float) -> None: ...

    def credits(self, movement: str, provider: str, amount: Decimal) -> None: ...


_recorder = Recorder()


def install(recorder: Recorder) -> None:
    """Send this process's events to `recorder` (an exporter's), from now on."""
    global _recorder  # noqa: PLW0603 - one per process, set at start like logging's handlers
    _recorder = recorder


def _report(event: str, *args) -> None:
    try:
        getattr(_recorder, event)(*args)
    except Exception:
        log.exception("recording %s failed", event)


def _since(start: datetime | None) -> float:
    start = aware_utc(start)
    return max((utcnow() - start).total_seconds(), 0.0) if start else 0.0


def job_submitted(provider: str, content_type: str) -> None:
    _report("job_submitted", provider, content_type)


def job_finished(job, status: str, code: str | None = None) -> None:
    """A job reached `status` (completed, failed, cancelled); timed from its submission.

    `job` is any row with provider, content_type and created_at.
    """
    _report("job_finished", job.provider, job.content_type, status, code,
            _since(job.created_at))


def job_started(queue: str, queued_at: datetime | None) -> None:
    """The generate step took a job for the first time: how long it waited for a worker."""
    _report("job_started", queue, _since(queued_at))


def credits(movement: str, provider: str, amount: Decimal | None) -> None:
    """held, debited, released or refunded: an amount that moved on the ledger."""
    if amount:
        _report("credits", movement, provider, amount)


def provider_call(provider: str, operation: str, call, *args):
    """`call(*args)`, a request to a provider's adapter, timed and counted by its outcome:
    ok, pending (remote work still running), transient, refused (with the error code) or
    error (a bug in the adapter)."""
    started = time.monotonic()
    outcome, code = "error", ""
    try:
        result = call(*args)
        outcome = "pending" if isinstance(result, Pending) else "ok"
        return result
    except TransientError:
        outcome = "transient"
        raise
    except (ProviderError, PipelineError) as exc:  # rejected, filtered, quota, auth, a key
        outcome, code = "refused", exc.code
        raise
    finally:
        _report("provider_request", provider, operation, outcome, code,
                time.monotonic() - started)
