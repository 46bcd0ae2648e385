"""The Redis transport's shared client (tasks/redis_broker.py), on the real Redis."""

from __future__ import annotations

import threading

import pytest
from kombu import Connection

from pipeline.config import Settings
from tasks import redis_broker
from tasks.app import create_celery
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.redis


def test_a_channel_builds_one_client_for_its_commands_and_a_new_one_with_a_new_pool(
        own_redis_prefix):
    with Connection(REDIS_URL, transport=redis_broker.Transport,
                    transport_options={"global_keyprefix": own_redis_prefix}) as conn:
        channel = conn.channel()
        built = []
        make = channel.Client

        def counting(**kwargs):
            built.append(kwargs["connection_pool"])
            return make(**kwargs)

        channel.Client = counting
        queue = conn.SimpleQueue("shared-client", channel=channel)
        for n in range(20):
            queue.put({"n": n})
        received = []
        for _ in range(20):
            message = queue.get(timeout=5)
            received.append(message.payload["n"])
            message.ack()
        assert received == list(range(20))
        # 20 publishes, 20 deliveries and 20 acks each built a client before; now one
        # for all of them (and one for the blocking read, which keeps its own).
        assert built.count(channel.pool) == 1
        assert len(built) <= 2

        channel._disconnect_pools()  # what kombu does after a lost connection
        queue.put({"n": "again"})
        assert queue.get(timeout=5).payload == {"n": "again"}
        assert built.count(channel.pool) == 1  # the new pool got a client of its own
        queue.clear()
        queue.close()


def test_threads_share_the_client_safely(own_redis_prefix):
    with Connection(REDIS_URL, transport=redis_broker.Transport,
                    transport_options={"global_keyprefix": own_redis_prefix}) as conn:
        queue = conn.SimpleQueue("shared-threads")
        errors = []

        def put(start: int):
            try:
                for n in range(start, start + 50):
                    queue.put({"n": n})
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(k * 50,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        got = set()
        for _ in range(400):
            message = queue.get(timeout=5)
            got.add(message.payload["n"])
            message.ack()
        assert got == set(range(400))
        queue.close()


def test_the_app_uses_it_for_a_redis_broker(tmp_path, own_redis_prefix):
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path), "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
        "DATABASE_URL": "postgresql://db/x", "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_BROKER_KEY_PREFIX": own_redis_prefix, "SECRET_KEY": "k",
        "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ="})
    app = create_celery(settings)
    with app.connection_for_write() as conn:
        assert isinstance(conn.default_channel, redis_broker.Channel)
