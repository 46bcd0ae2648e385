"""kombu's filesystem transport, with each message written whole before it can be seen,
and each queue's binding written into the folder's routing table before it is used.

The stock transport creates the message file and then writes into it; a worker that
lists the folder in between moves and reads an empty or half-written file, and dies on
the JSON ("Unrecoverable error: JSONDecodeError"). Here the message is written under a
name no queue matches and renamed into place, which is atomic on one filesystem.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        # The stock transport notes a binding in one state shared by the whole process,
        # then writes it into the folder's routing table (the control folder), and skips
        # both when that state has it already. So a second connection of the process
        # that declared the same queue a moment later could publish before the table was
        # written (the message finds no queue), and a process that opened another
        # folder never wrote that folder's table at all. The table is written first,
        # on every declaration (`_queue_bind` adds a binding only when it is missing).
        exchange = exchange or "amq.direct"
        meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *meta)
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)

    def _put(self, queue, payload, **kwargs):
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"  # `<queue>.msg.part`: skipped by every reader
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def install() -> None:
    """Make `filesystem://` URLs use this transport, in this process."""
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
