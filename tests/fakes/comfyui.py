"""Fake ComfyUI: validated /prompt, a worker-run queue, history, /view, /interrupt, and the
/ws websocket with progress events (API-NOTES 6)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
import threading
import time
import uuid
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from tests.fakes.base import FakeServer, Reply, Request, main
from tests.fakes.base import _Handler as _HttpHandler
from tests.fakes.comfyui_graph import OUTPUT_NODES, canonical, error, validate
from tests.fakes.media import png_bytes

A = "(?:/api)?"  # every route is served at /<path> and /api/<path>
WS_PATH = re.compile(f"{A}/ws")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


def _now_ms() -> int:
    return int(time.time() * 1000)


class FakeComfyUI(FakeServer):
    """Fake ComfyUI: a background worker runs queued prompts and writes history and PNGs."""

    routes: ClassVar = [
        ("POST", f"{A}/prompt", "prompt"),
        ("GET", f"{A}/prompt", "prompt_info"),
        ("GET", f"{A}/queue", "queue"),
        ("POST", f"{A}/queue", "queue_edit"),
        ("POST", f"{A}/interrupt", "interrupt"),
        ("GET", f"{A}/history/(?P<id>[^/]+)", "history"),
        ("GET", f"{A}/view", "view"),
        ("GET", f"{A}/system_stats", "system_stats"),
    ]
    # paused: the worker takes nothing from the queue; hold: a running prompt waits for an
    # interrupt or for hold to be cleared (before its last progress step); error: an
    # exception message to fail prompts with; websocket: False makes /ws a 404.
    defaults: ClassVar = {
        "paused": False,
        "hold": False,
        "run_seconds": 0.02,
        "error": None,
        "checkpoints": ["sd_xl_base_1.0.safetensors"],
        "websocket": True,
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pending: list[list[Any]] = []  # [number, prompt_id, prompt, extra_data, outputs]
        self.running: list[Any] | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.interrupted: list[str | None] = []  # the prompt_id of each /interrupt (or None)
        self._counter = 0
        self._file_counters: dict[str, int] = {}
        self._interrupt = threading.Event()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self.sockets: dict[str, _WebSocket] = {}  # clientId -> its open websocket
        self.ws_clients: list[str] = []  # the clientId of every websocket accepted
        self._httpd.RequestHandlerClass = _Handler  # /ws upgrades; all else as FakeServer

    def start(self) -> FakeComfyUI:
        super().start()
        self._worker.start()
        return self

    def stop(self) -> None:
        super().stop()
        self.drop_websockets()

    # The websocket (API-NOTES 6.7) ---------------------------------------------------------

    def serve_websocket(self, handler: _Handler, key: str) -> None:
        """Answer the upgrade, then keep the socket until it closes or the fake stops."""
        client_id = dict(parse_qsl(urlsplit(handler.path).query)).get("clientId") or (
            uuid.uuid4().hex
        )
        handler.close_connection = True
        handler.wfile.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {ws_accept(key)}\r\n\r\n"
            ).encode()
        )
        ws = _WebSocket(handler.connection)
        with self.lock:
            remaining = len(self.pending) + (self.running is not None)
        ws.send_json(
            "status", {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}
        )
        with self.lock:
            self.ws_clients.append(client_id)
            self.sockets[client_id] = ws  # a reused clientId replaces the older socket
        try:
            ws.serve(self.stopping)
        finally:
            with self.lock:
                if self.sockets.get(client_id) is ws:
                    del self.sockets[client_id]

    def drop_websockets(self) -> int:
        """Cut every open websocket (as a crashing server would); returns how many."""
        with self.lock:
            doomed = list(self.sockets.values())
            self.sockets.clear()
        for ws in doomed:
            ws.kill()
        return len(doomed)

    def _emit(
        self, client_id: str | None, kind: str, data: dict[str, Any], broadcast: bool = False
    ) -> None:
        """Send `{"type", "data"}` to the prompt's client's socket (or to all of them)."""
        with self.lock:
            if broadcast:
                targets = list(self.sockets.values())
            else:
                targets = [self.sockets[client_id]] if client_id in self.sockets else []
        for ws in targets:
            ws.send_json(kind, data)

    def enqueue(
        self, graph: dict[str, Any], prompt_id: str | None = None, client_id: str | None = None
    ) -> list[Any]:
        """Queue a prompt as /prompt would, without validation (to preload an instance)."""
        outputs = [n for n, node in graph.items() if node.get("class_type") in OUTPUT_NODES]
        extra = {"client_id": client_id, "create_time": _now_ms()}
        with self.lock:
            item = [self._counter, prompt_id or str(uuid.uuid4()), graph, extra, outputs]
            self.pending.append(item)
            self._counter += 1
        return item

    # Routes ------------------------------------------------------------------------------

    def handle_prompt(self, request: Request) -> Reply:
        body = request.json()
        if not isinstance(body, dict) or "prompt" not in body:
            reason = "No prompt provided"
            return Reply(400, {"error": error("no_prompt", reason, reason), "node_errors": {}})
        prompt_id = body.get("prompt_id")
        if prompt_id is not None and not canonical(prompt_id):
            return Reply(
                400,
                {
                    "error": error(
                        "invalid_prompt_id", "Invalid prompt_id", f"{prompt_id!r} is not a UUID"
                    ),
                    "node_errors": {},
                },
            )
        problem, node_errors = validate(body["prompt"], self.config["checkpoints"])
        if problem:
            return Reply(400, {"error": problem, "node_errors": node_errors})
        number, prompt_id, *_ = self.enqueue(body["prompt"], prompt_id, body.get("client_id"))
        return Reply(200, {"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def handle_prompt_info(self, request: Request) -> Reply:
        with self.lock:
            remaining = len(self.pending) + (self.running is not None)
        return Reply(200, {"exec_info": {"queue_remaining": remaining}})

    def handle_queue(self, request: Request) -> Reply:
        with self.lock:
            running = [self.running] if self.running else []
            return Reply(200, {"queue_running": running, "queue_pending": list(self.pending)})

    def handle_queue_edit(self, request: Request) -> Reply:
        body = request.json() or {}
        with self.lock:  # only pending items go; a running prompt needs /interrupt
            if body.get("clear"):
                self.pending.clear()
            doomed = set(body.get("delete") or [])
            self.pending = [item for item in self.pending if item[1] not in doomed]
        return Reply(200)

    def handle_interrupt(self, request: Request) -> Reply:
        target = (request.json() or {}).get("prompt_id") if request.body else None
        with self.lock:
            self.interrupted.append(target)
            if self.running and target in (None, self.running[1]):
                self._interrupt.set()
        return Reply(200)

    def handle_history(self, request: Request) -> Reply:
        with self.lock:
            entry = self.history.get(request.params["id"])
        return Reply(200, {request.params["id"]: entry} if entry else {})

    def handle_view(self, request: Request) -> Reply:
        name, kind = request.query.get("filename", ""), request.query.get("type", "output")
        if name.startswith("/") or ".." in name or kind not in ("output", "input", "temp"):
            return Reply(400)
        data = self.files.get((name, request.query.get("subfolder", ""), kind))
        if data is None:
            return Reply(404)
        return Reply(
            200, data, {"Content-Type": "image/png", "Content-Disposition": f'filename="{name}"'}
        )

    def handle_system_stats(self, request: Request) -> Reply:
        return Reply(
            200,
            {
                "system": {"os": "posix", "comfyui_version": "fake"},
                "devices": [{"name": "fake", "type": "cpu", "index": 0}],
            },
        )

    # The worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                item = None
                if self.pending and not self.config["paused"] and self.running is None:
                    item = min(self.pending, key=lambda i: i[0])
                    self.pending.remove(item)
                    self.running = item
                    self._interrupt.clear()
            if item is None:
                self.stopping.wait(0.01)
                continue
            started = _now_ms()
            self._finish(item, started, self._run(item, started))

    def _run(self, item: list[Any], started: int) -> bool:
        """Run for run_seconds, sending the start events and ~10 progress steps a second."""
        _, prompt_id, graph, extra, _ = item
        client = extra.get("client_id")
        stamp = {"prompt_id": prompt_id, "timestamp": started}
        self._emit(client, "execution_start", stamp)
        self._emit(client, "execution_cached", {"nodes": [], **stamp})
        node = next((n for n, v in graph.items() if v.get("class_type") == "KSampler"), None)
        node = node or next(iter(graph), None)
        self._emit(
            client, "executing", {"node": node, "display_node": node, "prompt_id": prompt_id}
        )
        steps = max(1, min(20, round(self.config["run_seconds"] * 10)))
        for step in range(1, steps + 1):
            if self._interrupt.wait(self.config["run_seconds"] / steps):
                return True
            while step == steps and self.config["hold"] and not self.stopping.is_set():
                if self._interrupt.wait(0.01):
                    return True
            progress = {"value": step, "max": steps, "prompt_id": prompt_id, "node": node}
            self._emit(client, "progress", progress, broadcast=client is None)
        return False

    def _finish(self, item: list[Any], started: int, interrupted: bool) -> None:
        _, prompt_id, graph, extra, output_ids = item
        stamp = {"prompt_id": prompt_id, "timestamp": started}
        messages = [["execution_start", stamp], ["execution_cached", {"nodes": [], **stamp}]]
        outputs: dict[str, Any] = {}
        # Failures are pinned on the sampler, where a real run would spend its time.
        at = {"prompt_id": prompt_id, "node_id": "3", "node_type": "KSampler", "executed": []}
        if interrupted:
            messages.append(["execution_interrupted", {**at, "timestamp": _now_ms()}])
        elif self.config["error"]:
            failure = {"exception_message": self.config["error"], "exception_type": "RuntimeError"}
            details = {"traceback": [], "current_inputs": {}, "current_outputs": []}
            messages.append(
                ["execution_error", {**at, **failure, **details, "timestamp": _now_ms()}]
            )
        else:
            outputs = {
                node_id: {"images": [self._save(graph, graph[node_id])]} for node_id in output_ids
            }
            messages.append(["execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()}])
        ok = not interrupted and not self.config["error"]
        client = extra.get("client_id")
        for node_id, output in outputs.items():
            executed = {"node": node_id, "display_node": node_id, "output": output}
            self._emit(client, "executed", {**executed, "prompt_id": prompt_id})
        kind, data = messages[-1]
        self._emit(client, kind, data, broadcast=kind == "execution_interrupted")
        with self.lock:
            self.history[prompt_id] = {
                "prompt": item,
                "outputs": outputs,
                "status": {
                    "status_str": "success" if ok else "error",
                    "completed": ok,
                    "messages": messages,
                },
                "meta": {
                    n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                    for n in outputs
                },
            }
            self.running = None
        self._emit(client, "executing", {"node": None, "prompt_id": prompt_id})

    def _save(self, graph: dict[str, Any], node: dict[str, Any]) -> dict[str, str]:
        size = next(
            (
                {k: n["inputs"][k] for k in ("width", "height")}
                for n in graph.values()
                if n["class_type"] in ("EmptyLatentImage", "EmptyImage")
            ),
            {"width": 64, "height": 64},
        )
        colour = next(
            (n["inputs"]["color"] for n in graph.values() if n["class_type"] == "EmptyImage"),
            0x3366CC,
        )
        rgb = ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255)
        temp = node["class_type"] == "PreviewImage"
        prefix = "ComfyUI_temp" if temp else node["inputs"].get("filename_prefix", "ComfyUI")
        subfolder, _, base = prefix.rpartition("/")
        with self.lock:
            count = self._file_counters[prefix] = self._file_counters.get(prefix, 0) + 1
        image = {
            "filename": f"{base}_{count:05}_.png",
            "subfolder": subfolder,
            "type": "temp" if temp else "output",
        }
        self.files[(image["filename"], subfolder, image["type"])] = png_bytes(
            min(size["width"], 1024), min(size["height"], 1024), rgb
        )
        return image


def ws_accept(key: str) -> str:
    """The Sec-WebSocket-Accept answer to a Sec-WebSocket-Key."""
    return base64.b64encode(
        hashlib.sha1((key + WS_GUID).encode(), usedforsecurity=False).digest()
    ).decode()


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final, unmasked frame (a server's): 1 text, 8 close, 10 pong."""
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, size)
    return head + payload


def _parse_frame(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, unmasked payload, rest) of the first whole frame in buffer, or None."""
    if len(buffer) < 2:
        return None
    opcode, masked, size, at = buffer[0] & 0x0F, buffer[1] & 0x80, buffer[1] & 0x7F, 2
    if size >= 126:
        width = 2 if size == 126 else 8
        if len(buffer) < 2 + width:
            return None
        size, at = int.from_bytes(buffer[2 : 2 + width], "big"), 2 + width
    mask = buffer[at : at + 4] if masked else b"\0\0\0\0"
    at += 4 if masked else 0
    if len(buffer) < at + size:
        return None
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buffer[at : at + size]))
    return opcode, payload, buffer[at + size :]


class _WebSocket:
    """The server side of one websocket: sends text frames; of the client's, answers only
    close and ping."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = threading.Event()
        self._send_lock = threading.Lock()

    def send_json(self, kind: str, data: dict[str, Any]) -> None:
        self.send(json.dumps({"type": kind, "data": data}).encode())

    def send(self, payload: bytes, opcode: int = 1) -> None:
        if self.closed.is_set():
            return
        try:
            with self._send_lock:
                self.sock.sendall(ws_frame(payload, opcode))
        except OSError:  # the client went away
            self.kill()

    def kill(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self, stopping: threading.Event) -> None:
        buffer = b""
        self.sock.settimeout(0.1)  # to notice stop() and kill()
        while not self.closed.is_set() and not stopping.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            while (frame := _parse_frame(buffer)) is not None:
                opcode, payload, buffer = frame
                if opcode == 8:  # close: echo it, then hang up
                    self.send(payload[:2], 8)
                    self.kill()
                elif opcode == 9:
                    self.send(payload, 10)
        self.kill()


class _Handler(_HttpHandler):
    def do_GET(self) -> None:
        fake = self.server.fake  # type: ignore[attr-defined]
        key = self.headers.get("Sec-WebSocket-Key")
        if (
            key
            and fake.config["websocket"]
            and WS_PATH.fullmatch(urlsplit(self.path).path)
            and self.headers.get("Upgrade", "").lower() == "websocket"
        ):
            fake.serve_websocket(self, key)
        else:
            self._handle()  # with websocket off, /ws has no route: a 404


if __name__ == "__main__":
    main(FakeComfyUI)
