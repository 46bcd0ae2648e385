"""Start-up objects set aside from the garbage collector (service/heap.py), in processes of
their own: what the freeze keeps and drops, and that every long-lived process of ours
freezes once started (an API worker under gunicorn, a Celery node, a prefork pool
process). Its effect on latency is a benchmark's to show, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REDIS_URL, ROOT


def _python(script: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_freeze_collects_garbage_first_and_sets_the_rest_aside():
    seen = _python("""
        import gc, json, weakref
        from service import heap

        class Node:
            pass

        kept = [Node() for _ in range(1000)]
        lost = Node()
        lost.me = lost  # a cycle: only a collection can free it
        gone = weakref.ref(lost)
        del lost
        gc.disable()  # nothing collects it before the freeze does
        heap.freeze_startup_objects()
        print(json.dumps({"frozen": gc.get_freeze_count(), "cycle_freed": gone() is None,
                          "kept": len(kept)}))
    """)
    assert seen["cycle_freed"] is True  # collected, not kept for the life of the process
    assert seen["frozen"] >= seen["kept"]


def test_each_long_lived_process_freezes_once_started(tmp_path):
    """The hooks gunicorn and Celery call: an API worker once its app is loaded, a node
    when ready (its own tasks too, with the threads and gevent pools), a prefork pool
    process as it starts."""
    env = {"PATH": "/usr/bin:/bin", "PIPELINE_DATA_DIR": str(tmp_path / "var"),
           "PIPELINE_ENV_FILE": str(tmp_path / "no.env"), "CELERY_BROKER_URL": REDIS_URL,
           "DATABASE_URL": f"sqlite:///{tmp_path}/heap.db"}
    seen = _python("""
        import gc, json
        from celery import signals
        import tasks.worker
        from service import gunicorn_conf

        counts = {}
        for name, fire in (
                ("node", lambda: signals.worker_ready.send(sender=None)),
                ("pool_process", lambda: signals.worker_process_init.send(sender=None)),
                ("api_worker", lambda: gunicorn_conf.post_worker_init(None))):
            gc.unfreeze()
            fire()
            counts[name] = gc.get_freeze_count()
        print(json.dumps(counts))
    """, env=env)
    assert all(count > 10_000 for count in seen.values()), seen
