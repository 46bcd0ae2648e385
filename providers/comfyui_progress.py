"""Progress of ComfyUI prompts from the instance's websocket (API-NOTES 6.7).

One daemon thread per websocket URL (instance + clientId), started on first need and shared
by every provider in the process (a second socket with the same clientId would replace the
first on the server). It keeps the latest fraction per prompt id. Polling stays the source
of truth for completion: this is a hint only, and any failure here just means "no progress".
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from urllib.parse import urlencode, urlsplit, urlunsplit

import websocket

log = logging.getLogger(__name__)

RECV_TIMEOUT = 1.0  # a read wakes this often to notice it is idle or stopped
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0  # seconds between reconnection attempts
IDLE_SECONDS = 120.0  # a listener nobody asked for this long ends (and is remade on need)
MAX_PROMPTS = 1000  # prompts remembered per listener, oldest dropped first


def ws_url(base_url: str, client_id: str) -> str:
    """`http://host:8188[/api]` -> `ws://host:8188[/api]/ws?clientId=<client_id>`."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, urlencode({"clientId": client_id}), ""))


def _fraction(kind: object, data: dict) -> float | None:
    if kind == "progress":
        value, maximum = data.get("value"), data.get("max")
        if (
            isinstance(value, int | float)
            and isinstance(maximum, int | float)
            and not isinstance(value, bool)
            and not isinstance(maximum, bool)
            and maximum > 0
        ):
            return min(max(value / maximum, 0.0), 1.0)
        return None
    if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
        return 1.0
    return None


class ProgressListener:
    """A websocket reader for one instance and clientId; `progress(prompt_id)` never raises."""

    def __init__(self, url: str, connect_timeout: float = 5.0):
        self.url = url
        self.connect_timeout = connect_timeout
        self.connected = False
        self._lock = threading.Lock()
        self._progress: OrderedDict[str, float] = OrderedDict()
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

    def progress(self, prompt_id: str) -> float | None:
        """The latest fraction (0..1) reported for the prompt, or None if none was seen."""
        with self._lock:
            self._used = time.monotonic()
            return self._progress.get(prompt_id)

    def forget(self, prompt_id: str) -> None:
        with self._lock:
            self._progress.pop(prompt_id, None)

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
                try:
                    ws.settimeout(RECV_TIMEOUT)
                    self._listen(ws)
                except Exception as exc:  # dropped, reset, malformed frame
                    log.debug("comfyui websocket %s lost: %s", self.url, exc)
                finally:
                    self.connected = False
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
        fraction = _fraction(message.get("type"), data)
        if not isinstance(prompt_id, str) or fraction is None:
            return
        with self._lock:
            self._progress[prompt_id] = fraction
            self._progress.move_to_end(prompt_id)
            while len(self._progress) > MAX_PROMPTS:
                self._progress.popitem(last=False)


_listeners: dict[str, ProgressListener] = {}
_registry_lock = threading.Lock()


def listener(base_url: str, client_id: str, connect_timeout: float = 5.0) -> ProgressListener:
    """The running listener for an instance and clientId, started if there is none."""
    url = ws_url(base_url, client_id)
    with _registry_lock:
        found = _listeners.get(url)
        if found is None or not found.alive:  # never started here, idled out, or forked
            found = _listeners[url] = ProgressListener(url, connect_timeout).start()
        return found


def forget(base_url: str, client_id: str, prompt_id: str) -> None:
    """Drop a finished prompt's progress, without starting a listener; never raises."""
    try:
        with _registry_lock:
            found = _listeners.get(ws_url(base_url, client_id))
        if found is not None:
            found.forget(prompt_id)
    except Exception as exc:
        log.debug("comfyui progress for %s not forgotten: %s", prompt_id, exc)
