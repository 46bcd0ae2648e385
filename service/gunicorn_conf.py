"""gunicorn hooks for the API: one metrics folder for all its processes.

    gunicorn -c python:service.gunicorn_conf --bind 0.0.0.0:8000 --workers 4 "api.wsgi:create()"

Each gunicorn worker is an API process, and a scrape reaches one of them: they record into
files in one folder (prometheus-client's multiprocess mode), so whichever answers sums
them all. The master empties the folder (METRICS_DIR/api, default ./var/metrics/api)
before it forks, and drops each exited worker's live gauges. One gunicorn per folder.
Only gunicorn's own hook names live here: gunicorn reads every setting it knows from
this module.
"""

from __future__ import annotations

from pathlib import Path


def on_starting(server):
    from pipeline.config import data_dir_of, environment
    from service import metrics

    env = environment()
    base = Path(env["METRICS_DIR"]) if env.get("METRICS_DIR") else data_dir_of(env) / "metrics"
    metrics.use_directory(base.resolve() / "api")


def post_worker_init(worker):
    from service import heap

    heap.freeze_startup_objects()  # the app is loaded: its modules live as long as we do


def child_exit(server, worker):
    from service import metrics

    metrics.mark_process_dead(worker.pid)
