"""A job's sign of life while its generate step waits on a provider call, an upload or a poll.

The sweeper re-drives a processing job whose heartbeat is older than STALE_AFTER_SECONDS.
Renewing it from a small thread while the work is in flight makes that staleness mean
"the worker is gone", never "the call is slow", so a healthy slow call is never started
twice. The same thread renews the job's instance lease, and notices when the job ended
elsewhere (the sweeper expired its hold, a client cancelled it) so the work can stop.
"""

from __future__ import annotations

import logging
import threading

from pipeline import leases, lifecycle

log = logging.getLogger("pipeline.heartbeat")


def interval_for(stale_after_seconds: float) -> float:
    """Five beats per staleness window: one lost beat never makes a live job look dead."""
    return max(0.2, stale_after_seconds / 5)


class Heartbeat:
    """`with Heartbeat(...) as beat:` renews the heartbeat until the block ends.

    `beat.ended` is set once the job is no longer processing. `beat.now(...)` records the
    remote id and progress at once (a remote id must be saved before anything else fails).
    """

    def __init__(self, engine, job_id, *, stale_after_seconds: float,
                 lease: str | None = None):
        self.engine, self.job_id, self.lease = engine, job_id, lease
        self.interval = interval_for(stale_after_seconds)
        self.lease_ttl = stale_after_seconds
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat {job_id}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def now(self, *, remote_id: str | None = None, progress: float | None = None) -> bool:
        """Beat at once; False (and `ended` set) when the job is no longer processing."""
        alive = lifecycle.heartbeat(self.engine, self.job_id, remote_id=remote_id,
                                    progress=progress)
        if not alive:
            self.ended.set()
        if self.lease is not None:
            leases.renew(self.engine, self.lease, self.job_id, ttl_seconds=self.lease_ttl)
        return alive

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if the job ended meanwhile."""
        return self.ended.wait(seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.now()
            except Exception as exc:  # a database blip: the next beat tries again
                log.warning("job %s: heartbeat failed: %s", self.job_id, type(exc).__name__)
