"""The Redis announcer against a real Redis: wake-ups leave from a sender thread, in order,
from forked children too, are flushed when a process exits, and a Redis that stops
answering holds up the sender only, never the job step that announced."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
import uuid
from urllib.parse import urlsplit

import pytest
import redis

from service import announce
from service.announce import RedisAnnouncer
from tests.conftest import REDIS_URL, ROOT
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis


@pytest.fixture
def channel():
    """A channel of this test's own, subscribed before anything is sent."""
    name = f"cp-test-{uuid.uuid4().hex[:10]}:job-events"
    client = redis.Redis.from_url(REDIS_URL)
    subscriber = client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(name)
    subscriber.get_message(timeout=1.0)  # the subscribe confirmation
    yield name, subscriber
    subscriber.close()
    client.close()


def _received(subscriber, count: int, timeout: float = 10.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = subscriber.get_message(timeout=0.2)
        if message is not None:
            got.append(message["data"].decode())
    return got


def test_wake_ups_arrive_in_the_order_they_were_announced(channel):
    name, subscriber = channel
    announcer = RedisAnnouncer(REDIS_URL, name, timeout=2.0)
    sent = [(uuid.uuid4(), event) for event in ("processing", "progress", "completed") * 40]
    for job_id, event in sent:
        announcer.job_changed(job_id, event)
    assert announcer.flush(10.0)
    assert _received(subscriber, len(sent)) == [announce.encode(j, e) for j, e in sent]


def test_a_forked_child_sends_its_own_and_an_exiting_process_flushes_what_is_queued(channel):
    """The child's announcer was used by its parent before the fork: the child must start
    a sender of its own. Neither process flushes by hand; the parent's last wake-up is
    announced just before it exits."""
    name, subscriber = channel
    script = textwrap.dedent(f"""
        import os, sys
        from service.announce import RedisAnnouncer
        announcer = RedisAnnouncer({REDIS_URL!r}, {name!r}, timeout=2.0)
        announcer.job_changed("parent-before-fork", "processing")
        announcer.flush(5.0)
        child = os.fork()
        if child == 0:
            announcer.job_changed("child", "completed")
            sys.exit(0)  # atexit runs: the flush sends it
        os.waitpid(child, 0)
        announcer.job_changed("parent-at-exit", "completed")
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=30)
    assert _received(subscriber, 3) == [
        "parent-before-fork processing", "child completed", "parent-at-exit completed"]


def test_a_silent_redis_holds_up_the_sender_and_never_the_announcing_step(channel, caplog):
    name, subscriber = channel
    upstream = urlsplit(REDIS_URL)
    with TcpProxy((upstream.hostname, upstream.port or 6379)) as proxy:
        proxy.hold()  # accepts, never answers
        announcer = RedisAnnouncer(f"redis://127.0.0.1:{proxy.port}/0", name, timeout=1.0)
        with caplog.at_level(logging.WARNING, logger="pipeline.jobevents"):
            for n in range(20):
                announcer.job_changed(f"job-{n}", "processing")
            # Every announce has returned while the sender still waits on its first send.
            assert not announcer.flush(0.2)
            assert announcer.flush(20.0)  # the send times out; the sender moves on
            proxy.forward()
            announcer.job_changed("job-during-quiet", "completed")
            assert announcer.flush(5.0)
    warnings = [r for r in caplog.records if "job wake-ups over Redis failed" in r.message]
    assert len(warnings) == 1
    # The wake-ups caught by the hold may still reach Redis (a stopped server reads its
    # sockets when continued); one announced while the announcer is quiet is never sent.
    assert "job-during-quiet completed" not in _received(subscriber, 21, timeout=2.0)


def test_a_url_redis_py_refuses_is_one_logged_failure_and_the_sender_lives_on(caplog):
    announcer = RedisAnnouncer("redis://127.0.0.1:not-a-port/0", "cp-test-x", timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.jobevents"):
        announcer.job_changed("job-1", "processing")
        assert announcer.flush(5.0)
        announcer.job_changed("job-2", "processing")  # quiet now: not even queued
        assert announcer.flush(5.0)  # the sender still answers
    [warning] = [r.message for r in caplog.records
                 if "job wake-ups over Redis failed" in r.message]
    assert "ValueError" in warning
