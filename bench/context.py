"""What every figure is handed: where to put its logs, how big a run is, and the helpers
that submit and count jobs through a real API."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from sqlalchemy import func, select

from pipeline.tables import jobs


@dataclass
class Context:
    workdir: Path
    quick: bool
    repetitions: int
    jobs: int  # jobs per throughput repetition
    log: callable = print
    notes: list[str] = field(default_factory=list)

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


TEXT_JOB = {"contentType": "text", "providerName": "local"}


def submit_many(url: str, api_key: str, count: int, *, body: dict = TEXT_JOB,
                threads: int = 8, label: str = "bench") -> list[str]:
    """POST `count` jobs from `threads` clients; the job ids, in no order."""
    local = threading.local()

    def one(n: int) -> str:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {api_key}"
        answer = session.post(f"{url}/v1/jobs", json={**body, "prompt": f"{label} {n}"},
                              timeout=30)
        if answer.status_code != 202:
            raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
        return answer.json()["jobId"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def count_by_status(engine, company_id) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.status, func.count()).where(
            jobs.c.company_id == company_id).group_by(jobs.c.status))
        return dict(rows.all())


def wait_completed(engine, company_id, total: int, *, timeout: float = 300,
                   interval: float = 0.05) -> float:
    """Wait until the company has `total` completed jobs; monotonic time when seen.

    Any failed job is an error: a figure over jobs that did not complete means nothing.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = count_by_status(engine, company_id)
        if counts.get("failed") or counts.get("cancelled"):
            raise RuntimeError(f"jobs ended otherwise than completed: {counts}")
        if counts.get("completed", 0) >= total:
            return time.monotonic()
        time.sleep(interval)
    raise RuntimeError(f"{total} jobs not completed after {timeout}s: "
                       f"{count_by_status(engine, company_id)}")
