"""The garbage collector in long-lived processes: what a process has built by the end of
its start-up is set aside, so the collector's full passes never walk it again.

Python's collection of its oldest generation walks every object it tracks. An API process
holds about 157,000 of them once started (Flask, SQLAlchemy, Celery, kombu, our modules),
and one such pass took 84 ms on the bench's machine, with every request that arrived
meanwhile waiting behind it: the tail of the submit latency. Nearly all of those objects
live as long as the process. `gc.freeze()` moves them to a permanent generation that
collections skip (the same pass then took 0.5 ms); what the process allocates later is
collected as before. Garbage is collected first, so nothing unreachable at start-up is
kept for the life of the process.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    gc.collect()
    gc.freeze()
