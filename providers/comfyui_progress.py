"""Progress of ComfyUI prompts from the instance's websocket (API-NOTES 6.7).

One daemon thread per websocket URL (instance + clientId), started on first need. The adapter
uses a clientId per job, so a restarted worker that opens the socket with the same clientId
hears the rest of the job's events (ComfyUI sends most events only to the submitting
clientId, and a second socket with that clientId replaces the first).

Progress is read over the whole graph from `progress_state` messages (each one carries every
node that started: running with value/max, or finished), so a graph with two samplers never
goes backwards and a graph without a sampler still moves; each node that runs counts the same.
Older servers send only `progress` (one node's steps), used until a `progress_state` arrives.
What a listener reports for a prompt never goes down. `executing` with node null ends failed and
interrupted prompts too, so only `execution_success` means 100%.

Polling stays the source of truth for completion: progress is a hint only, and any failure here
just means "no progress". `ended(prompt_id)` lets the adapter's `wait` read /history as soon as
the socket says a prompt ended (`executing` with node null) instead of a poll interval later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

import websocket

log = logging.getLogger(__name__)

RECV_TIMEOUT = 1.0  # a read wakes this often to notice it is idle or stopped
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0  # seconds between reconnection attempts
IDLE_SECONDS = 120.0  # a listener nobody asked for this long ends (and is remade on need)
# progress_state is broadcast to every socket: a job's listener hears other prompts too.
MAX_PROMPTS = 100


def ws_url(base_url: str, client_id: str) -> str:
    """`http://host:8188[/api]` -> `ws://host:8188[/api]/ws?clientId=<client_id>`."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, urlencode({"clientId": client_id}), ""))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ratio(value: object, maximum: object) -> float | None:
    if not (_is_number(value) and _is_number(maximum)) or maximum <= 0:
        return None
    return min(max(value / maximum, 0.0), 1.0)


def _node_fraction(state: object) -> float | None:
    """How far one node of a progress_state message is: finished is 1, running is value/max."""
    if not isinstance(state, dict):
        return None
    if state.get("state") == "finished":
        return 1.0
    return _ratio(state.get("value"), state.get("max"))


@dataclass
class PromptProgress:
    """What the socket said about one prompt."""

    nodes: dict[str, float] = field(default_factory=dict)  # node id -> its fraction done
    step: float | None = None  # the latest `progress` message (older servers)
    succeeded: bool = False
    best: float | None = None  # the highest fraction reported so far
    # `executing` with node null: sent after the history entry is written, however the
    # prompt ended (success, error, interrupt), so /history has it from then on.
    ended: threading.Event = field(default_factory=threading.Event)

    def hear(self, kind: object, data: dict) -> None:
        if kind == "progress_state" and isinstance(data.get("nodes"), dict):
            for node_id, state in data["nodes"].items():
                fraction = _node_fraction(state)
                if fraction is not None:
                    self.nodes[node_id] = max(fraction, self.nodes.get(node_id, 0.0))
        elif kind == "progress":
            self.step = _ratio(data.get("value"), data.get("max"))
        elif kind == "execution_success":
            self.succeeded = True
        elif kind == "executing" and "node" in data and data["node"] is None:
            self.ended.set()

    def fraction(self, expected: Collection[str]) -> float | None:
        """Done over the whole graph (`expected`: the ids of the nodes the prompt runs)."""
        if self.succeeded:
            now: float | None = 1.0
        elif self.nodes and expected:
            # Nodes that expand at run time (subgraphs) come on top of the submitted ones.
            now = sum(self.nodes.values()) / len(set(expected) | self.nodes.keys())
        else:
            now = self.step
        if now is not None:
            self.best = max(now, self.best or 0.0)
        return self.best


class ProgressListener:
    """A websocket reader for one instance and clientId; `progress(prompt_id)` never raises."""

    def __init__(
        self,
        url: str,
        connect_timeout: float = 5.0,
        prompts: OrderedDict[str, PromptProgress] | None = None,
    ):
        self.url = url
        self.connect_timeout = connect_timeout
        self.connected = False
        self.connections = 0  # counts connects and drops: a waiter re-reads history on either
        self._lock = threading.Lock()
        self._prompts: OrderedDict[str, PromptProgress] = prompts or OrderedDict()
        self._used = time.monotonic()
        self._heard = False  # whether the current connection delivered anything
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"comfyui-progress {url}", daemon=True
        )

    def start(self) -> ProgressListener:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (within RECV_TIMEOUT)."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def progress(self, prompt_id: str, expected: Collection[str] = ()) -> float | None:
        """The prompt's fraction done (0..1), never less than before; None if nothing heard."""
        with self._lock:
            self._used = time.monotonic()
            found = self._prompts.get(prompt_id)
            return found.fraction(expected) if found else None

    def ended(self, prompt_id: str) -> threading.Event:
        """Set once the socket says the prompt ended (made now if nothing was heard yet)."""
        with self._lock:
            self._used = time.monotonic()
            found = self._prompts.get(prompt_id)
            if found is None:
                found = self._prompts[prompt_id] = PromptProgress()
            return found.ended

    def handover(self) -> OrderedDict[str, PromptProgress]:
        """What this listener heard, for the one that replaces it (so nothing goes back)."""
        with self._lock:
            return OrderedDict(self._prompts)

    def _idle(self) -> bool:
        with self._lock:
            return time.monotonic() - self._used > IDLE_SECONDS

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set() and not self._idle():
            self._heard = False
            try:
                ws = websocket.create_connection(
                    self.url, timeout=self.connect_timeout, enable_multithread=False
                )
            except Exception as exc:  # refused, 404 handshake, DNS, TLS...: try again later
                log.debug("comfyui websocket %s unavailable: %s", self.url, exc)
            else:
                self.connected = True
                self.connections += 1
                try:
                    ws.settimeout(RECV_TIMEOUT)
                    self._listen(ws)
                except Exception as exc:  # dropped, reset, malformed frame
                    log.debug("comfyui websocket %s lost: %s", self.url, exc)
                finally:
                    self.connected = False
                    self.connections += 1
                    with contextlib.suppress(Exception):  # S110: nothing to tell anyone
                        ws.close(timeout=RECV_TIMEOUT)
            # A socket that delivered messages was healthy: reconnect promptly after a drop.
            backoff = BACKOFF_MIN if self._heard else min(backoff * 2, BACKOFF_MAX)
            self._stop.wait(backoff)

    def _listen(self, ws: websocket.WebSocket) -> None:
        """Read until the socket closes (or we are idle or stopped); raises if it breaks."""
        while not self._stop.is_set() and not self._idle():
            try:
                opcode, data = ws.recv_data()  # answers pings itself
            except (websocket.WebSocketTimeoutException, TimeoutError):
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            self._heard = True
            if opcode == websocket.ABNF.OPCODE_TEXT:  # binary frames are previews: ignored
                self._handle(data)

    def _handle(self, frame: bytes) -> None:
        try:
            message = json.loads(frame)
        except ValueError:  # UnicodeDecodeError included
            return
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        data = message["data"]
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):  # e.g. the `executing` sent on reconnect
            return
        with self._lock:
            found = self._prompts.get(prompt_id) or PromptProgress()
            found.hear(message.get("type"), data)
            self._prompts[prompt_id] = found
            self._prompts.move_to_end(prompt_id)
            while len(self._prompts) > MAX_PROMPTS:
                self._prompts.popitem(last=False)


_listeners: dict[str, ProgressListener] = {}
_registry_lock = threading.Lock()


def listener(base_url: str, client_id: str, connect_timeout: float = 5.0) -> ProgressListener:
    """The running listener for an instance and clientId, started if there is none."""
    url = ws_url(base_url, client_id)
    with _registry_lock:
        found = _listeners.get(url)
        if found is None or not found.alive:  # never started here, idled out, or forked
            heard = found.handover() if found else None
            found = _listeners[url] = ProgressListener(url, connect_timeout, heard).start()
        return found


def close(base_url: str, client_id: str) -> None:
    """Stop and drop the listener of an instance and clientId, if any; never raises."""
    try:
        with _registry_lock:
            found = _listeners.pop(ws_url(base_url, client_id), None)
        if found is not None:
            found.close()
    except Exception as exc:
        log.debug("comfyui listener for %s not closed: %s", client_id, exc)


def close_all() -> None:
    """Stop every listener of this process (at shutdown, or between tests)."""
    with _registry_lock:
        doomed = list(_listeners.values())
        _listeners.clear()
    for found in doomed:
        found.close()
