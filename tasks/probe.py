"""The broker as operators see it: does it answer, what waits in each queue, who listens.

Implements pipeline.status.Broker over the Celery app's own broker settings (URL, key
prefix, filesystem folders), on a connection whose every wait is bounded as the
publisher's are (tasks.app.publisher_options).
"""

from __future__ import annotations

import os
import tempfile

from tasks import names
from tasks.app import publisher_options


class BrokerProbe:
    """Short-lived questions to the broker; each makes its own connection and closes it."""

    def __init__(self, app, *, queues=names.ALL_QUEUES, worker_timeout: float = 1.0):
        self.app = app
        self.queues = tuple(queues)
        self.timeout = app.settings.publish_timeout_seconds
        self.worker_timeout = worker_timeout
        self.kind = app.settings.broker_url.split(":", 1)[0]

    @property
    def _filesystem(self) -> bool:
        return self.kind == "filesystem"

    def _connection(self):
        return self.app.connection_for_write(
            connect_timeout=self.timeout, transport_options=publisher_options(self.app.settings))

    def ping(self) -> None:
        if self._filesystem:
            # No server: the broker works while its folder takes a new message file.
            folder = self.app.conf.broker_transport_options["data_folder_out"]
            fd, path = tempfile.mkstemp(dir=folder, prefix=".readyz-")
            os.close(fd)
            os.unlink(path)
            return
        with self._connection() as conn:
            # Opening a channel is a round trip: Redis answers a PING, AMQP a Channel.Open.
            conn.channel().close()

    def queue_depths(self) -> dict[str, int]:
        depths = {}
        with self._connection() as conn:
            channel = conn.channel()
            for queue in self.queues:
                if hasattr(channel, "_size"):
                    # kombu's virtual transports (Redis, filesystem) count a queue with
                    # `_size`, as their passive declare does after asking whether it
                    # exists; but with a key prefix that question (EXISTS) goes out
                    # unprefixed, so the declare never finds the queue. LLEN is prefixed.
                    depths[queue] = channel._size(queue)
                    continue
                try:
                    depths[queue] = channel.queue_declare(queue=queue,
                                                          passive=True).message_count
                except conn.channel_errors:  # never declared: nothing waits in it
                    depths[queue] = 0
                    channel = conn.channel()  # AMQP closes a channel on a refused declare
            channel.close()
        return depths

    def live_workers(self) -> list[str] | None:
        if self._filesystem:
            return None  # that transport has no broadcast, so no remote control
        with self._connection() as conn:
            replies = self.app.control.ping(timeout=self.worker_timeout, connection=conn)
        return sorted(name for reply in replies for name in reply)
