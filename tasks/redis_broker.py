"""kombu's Redis transport, with one client per channel for its short commands.

kombu builds a new redis-py client for every publish, every message received (its
unacked index) and every acknowledgement: `Channel._create_client` on each call. Since
redis-py 5 a client's constructor builds its table of some 200 reply callbacks, so that
costs 0.12 ms of CPU each time, three times per message, before any command is sent.
A client is only a handle on the channel's connection pool and is safe to share between
threads (each command takes a connection from the pool), so this channel keeps one per
pool and builds it again only when kombu replaces the pool (after a disconnect). The
blocking reads (BRPOP) and the fanout subscription keep their own clients, as before.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES, redis


class Channel(redis.Channel):
    _shared_client = None

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(redis.Transport):
    Channel = Channel


def install() -> None:
    """Make `redis://` and `rediss://` URLs use this transport, in this process."""
    TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
