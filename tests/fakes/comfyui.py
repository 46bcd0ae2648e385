"""Fake ComfyUI: validated /prompt, a worker-run queue with ComfyUI's execution cache, history,
/view, /interrupt, and the /ws websocket with its progress events (API-NOTES 6)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import mimetypes
import random
import re
import socket
import struct
import threading
import time
import uuid
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.base import CONTROL, FakeServer, Reply, Request, main
from tests.fakes.base import _Handler as _HttpHandler
from tests.fakes.comfyui_graph import (
    OUTPUT_NODES,
    error,
    execution_order,
    inherited,
    signature,
    validate,
)
from tests.fakes.media import mp4_bytes, png_bytes

A = "(?:/api)?"  # every route is served at /<path> and /api/<path>
WS_PATH = re.compile(f"{A}/ws")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
# Where a real traceback points: the host's own paths, which adapters must not pass on.
TRACEBACK = '  File "/home/comfy/ComfyUI/execution.py", line 496, in execute\n'


def _now_ms() -> int:
    return int(time.time() * 1000)


def webp_bytes(frames: int = 1) -> bytes:
    """A RIFF/WEBP header with a VP8X chunk (animation flag set for several frames)."""
    flags = 0x02 if frames > 1 else 0
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + bytes(6)
    anim = b"ANIM" + struct.pack("<I", 6) + bytes(6) if frames > 1 else b""
    body = b"WEBP" + vp8x + anim
    return b"RIFF" + struct.pack("<I", len(body)) + body


class FakeComfyUI(FakeServer):
    """Fake ComfyUI: a background worker runs queued prompts node by node.

    Like the real server it accepts any string as a prompt id and runs a repeated one again;
    queues the outputs that validate and reports the others in `node_errors` (400 only when
    none validates); caches each node's result by its class and inputs (upstream included),
    keeping only what the latest prompt used, so a repeated graph runs nothing and its history
    lists the earlier prompt's files; sends `progress_state` to every socket and the other
    events to the prompt's clientId, and `executing` with node null after every prompt.
    KSampler nodes (or else the first node) are where the run's time is spent, in steps.
    """

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
    # exception message to fail prompts with (at their last working node); websocket: False
    # makes /ws a 404.
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
        self.files: dict[tuple[str, str, str], bytes] = {}  # (name, subfolder, type) -> bytes
        self.cache: dict[str, dict[str, Any] | None] = {}  # node signature -> its UI output
        self.interrupted: list[str | None] = []  # the prompt_id of each /interrupt (or None)
        self.last_node: str | None = None  # the node running now, told to a reconnecting client
        self._counter = 0
        self.interrupt_requested = threading.Event()
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

    # Test hooks -------------------------------------------------------------------------

    def delete_files(self, subfolder: str = "") -> int:
        """Remove stored files (those under `subfolder`, or all), as an operator's cleanup
        would; the cache still remembers them. Returns how many."""
        with self.lock:
            doomed = [k for k in self.files if (k[1] + "/").startswith(subfolder)]
            for key in doomed:
                del self.files[key]
        return len(doomed)

    def _control(self, request: Request) -> Reply:
        if request.path == f"{CONTROL}delete_files":  # the same hook for a subprocess fake
            return Reply(200, {"deleted": self.delete_files(**(request.json() or {}))})
        return super()._control(request)

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
            ours = self.running is not None and self.running[3].get("client_id") == client_id
            last_node = self.last_node if ours else None
        ws.send_json(
            "status", {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}
        )
        if last_node is not None:  # as server.py does for the client of the running prompt
            ws.send_json("executing", {"node": last_node})
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

    def emit(
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
        self,
        graph: dict[str, Any],
        prompt_id: str | None = None,
        client_id: str | None = None,
        outputs: list[str] | None = None,
    ) -> list[Any]:
        """Queue a prompt as /prompt would, without validation (to preload an instance)."""
        if outputs is None:
            outputs = [n for n, node in graph.items() if node.get("class_type") in OUTPUT_NODES]
        extra: dict[str, Any] = {"create_time": _now_ms()}
        if client_id is not None:
            extra["client_id"] = client_id
        with self.lock:
            item = [self._number(), prompt_id or str(uuid.uuid4()), graph, extra, outputs]
            self.pending.append(item)
        return item

    def _number(self, body: dict[str, Any] | None = None) -> float | int:
        """The queue priority server.py gives a prompt: its own, or the next of the counter."""
        body = body or {}
        if "number" in body:
            return float(body["number"])
        with self.lock:
            number = -self._counter if body.get("front") else self._counter
            self._counter += 1
        return number

    # Routes ------------------------------------------------------------------------------

    def handle_prompt(self, request: Request) -> Reply:
        body = request.json()
        if not isinstance(body, dict) or "prompt" not in body:
            reason = "No prompt provided"
            return Reply(400, {"error": error("no_prompt", reason, reason), "node_errors": {}})
        number = self._number(body)
        # Any string goes, and nothing is deduplicated: the same id sent twice runs twice.
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        problem, outputs, node_errors = validate(body["prompt"], self.config["checkpoints"])
        if problem:
            return Reply(400, {"error": problem, "node_errors": node_errors})
        extra = dict(body.get("extra_data") or {}, create_time=_now_ms())
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        with self.lock:
            self.pending.append([number, prompt_id, body["prompt"], extra, outputs])
        return Reply(200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

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
            for doomed in body.get("delete") or []:  # the first item with that id, per id
                found = next((item for item in self.pending if item[1] == doomed), None)
                if found is not None:
                    self.pending.remove(found)
        return Reply(200)

    def handle_interrupt(self, request: Request) -> Reply:
        target = (request.json() or {}).get("prompt_id") if request.body else None
        with self.lock:
            self.interrupted.append(target)
            if self.running and target in (None, self.running[1]):
                self.interrupt_requested.set()
        return Reply(200)

    def handle_history(self, request: Request) -> Reply:
        prompt_id = unquote(request.params["id"])  # aiohttp decodes the path; any id may come
        with self.lock:
            entry = self.history.get(prompt_id)
        return Reply(200, {prompt_id: entry} if entry else {})

    def handle_view(self, request: Request) -> Reply:
        name, kind = request.query.get("filename", ""), request.query.get("type", "output")
        if name.startswith("/") or ".." in name or kind not in ("output", "input", "temp"):
            return Reply(400)
        with self.lock:
            data = self.files.get((name, request.query.get("subfolder", ""), kind))
        if data is None:
            return Reply(404)
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Reply(200, data, {"Content-Type": mime, "Content-Disposition": f'filename="{name}"'})

    def handle_system_stats(self, request: Request) -> Reply:
        return Reply(
            200,
            {
                "system": {"os": "posix", "comfyui_version": "fake"},
                "devices": [{"name": "fake", "type": "cpu", "index": 0}],
            },
        )

    # The worker (main.py prompt_worker, execution.py PromptExecutor) ------------------------

    def _work(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                item = None
                if self.pending and not self.config["paused"] and self.running is None:
                    item = min(self.pending, key=lambda i: i[0])
                    self.pending.remove(item)
                    self.running = item
                    self.interrupt_requested.clear()
            if item is None:
                self.stopping.wait(0.01)
                continue
            run = _Run(self, item)
            ok = run.execute()
            with self.lock:
                self.history[item[1]] = run.history(ok)
                self.running = self.last_node = None
            self.emit(item[3].get("client_id"), "executing", {"node": None, "prompt_id": item[1]})

    def cached_nodes(self, signatures: dict[str, str]) -> list[str]:
        """Keep only the cache entries this prompt can use (the classic cache), and say
        which of its nodes they answer for."""
        with self.lock:
            used = set(signatures.values())
            self.cache = {k: v for k, v in self.cache.items() if k in used}
            return [n for n, key in signatures.items() if key in self.cache]

    def save(self, graph: dict[str, Any], node_id: str) -> dict[str, Any]:
        """Write an output node's files and return its UI output, as the node class would."""
        node, inputs = graph[node_id], graph[node_id].get("inputs") or {}
        batch = int(inherited(graph, node_id, "batch_size", 1))
        if node["class_type"] == "SaveVideo":
            saved = self._store(inputs["filename_prefix"], "mp4", mp4_bytes(node_id))
            return {"images": [saved], "animated": [True]}
        if node["class_type"] == "SaveAnimatedWEBP":
            saved = self._store(inputs["filename_prefix"], "webp", webp_bytes(batch))
            return {"images": [saved], "animated": [batch != 1]}
        if node["class_type"] == "PreviewImage":  # nodes.py: a random temp prefix per node
            letters = "".join(random.choices("abcdefghijklmnopqrstupvxyz", k=5))
            prefix, folder = f"ComfyUI_temp_{letters}", "temp"
        else:
            prefix, folder = inputs["filename_prefix"], "output"
        size = [min(int(inherited(graph, node_id, side, 64)), 1024) for side in ("width", "height")]
        colour = int(inherited(graph, node_id, "color", 0x3366CC))
        png = png_bytes(*size, ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255))
        return {"images": [self._store(prefix, "png", png, folder) for _ in range(batch)]}

    def _store(
        self, prefix: str, extension: str, data: bytes, folder: str = "output"
    ) -> dict[str, str]:
        """Save under folder_paths.get_save_image_path's name: the next free counter."""
        subfolder, _, base = prefix.rpartition("/")
        taken = re.compile(rf"{re.escape(base)}_(\d{{5}})_\..*")
        with self.lock:
            counters = [
                int(m.group(1))
                for name, sub, kind in self.files
                if sub == subfolder and kind == folder and (m := taken.fullmatch(name))
            ]
            filename = f"{base}_{max(counters, default=0) + 1:05}_.{extension}"
            self.files[(filename, subfolder, folder)] = data
        return {"filename": filename, "subfolder": subfolder, "type": folder}


class _Run:
    """One prompt executed node by node, with the messages and progress of execution.py."""

    def __init__(self, fake: FakeComfyUI, item: list[Any]):
        self.fake, self.item = fake, item
        self.prompt_id, self.graph, self.extra, self.outputs = item[1], item[2], item[3], item[4]
        self.client = self.extra.get("client_id")
        self.messages: list[list[Any]] = []
        self.states: dict[str, dict[str, Any]] = {}  # the progress registry's nodes
        self.executed: list[str] = []
        self.signatures = {n: signature(self.graph, n) for n in self.graph}
        self.order = execution_order(self.graph, self.outputs)
        samplers = [n for n in self.order if self.graph[n]["class_type"] == "KSampler"]
        self.working = samplers or self.order[:1]

    def message(self, kind: str, data: dict[str, Any], broadcast: bool = False) -> None:
        """Record an execution_* message in the history, and send it."""
        data = {**data, "timestamp": _now_ms()}
        self.messages.append([kind, data])
        if self.client is not None or broadcast:
            self.fake.emit(self.client, kind, data, broadcast=self.client is None)

    def execute(self) -> bool:
        stamp = {"prompt_id": self.prompt_id}
        self.message("execution_start", stamp)
        cached = self.fake.cached_nodes(self.signatures)
        self.message("execution_cached", {"nodes": cached, **stamp})
        for node_id in self.order:
            if not self.node(node_id):
                return False
        self.message("execution_success", stamp)
        return True

    def node(self, node_id: str) -> bool:
        key = self.signatures[node_id]
        with self.fake.lock:
            hit, ui = key in self.fake.cache, self.fake.cache.get(key)
        if hit:  # execution.py tells the client of every cached node, UI output or None
            self.send("executed", {"node": node_id, "display_node": node_id, "output": ui})
        elif not self.run(node_id, key):
            return False
        self.progress(node_id, "finished", 1, 1)
        return True

    def run(self, node_id: str, key: str) -> bool:
        """Execute a node that is not cached; False if the prompt stops here."""
        self.progress(node_id, "running", 0, 1)
        self.fake.last_node = node_id
        self.send("executing", {"node": node_id, "display_node": node_id})
        if node_id in self.working and not self.steps(node_id):
            return self.fail(node_id, "execution_interrupted", {}, broadcast=True)
        if self.fake.config["error"] and node_id == self.working[-1]:
            return self.fail(node_id, "execution_error", self.error_details(), broadcast=False)
        output_node = self.graph[node_id]["class_type"] in OUTPUT_NODES
        ui = self.fake.save(self.graph, node_id) if output_node else None
        with self.fake.lock:
            self.fake.cache[key] = ui
        self.executed.append(node_id)
        if ui:
            self.send("executed", {"node": node_id, "display_node": node_id, "output": ui})
        return True

    def steps(self, node_id: str) -> bool:
        """Spend this node's share of run_seconds in steps; False if interrupted."""
        config = self.fake.config
        wanted = self.graph[node_id].get("inputs", {}).get("steps")
        default = max(1, min(20, round(config["run_seconds"] * 10)))
        total = wanted if isinstance(wanted, int) and wanted > 0 else default
        pause = config["run_seconds"] / len(self.working) / total
        interrupt, last = self.fake.interrupt_requested, node_id == self.working[-1]
        for step in range(1, total + 1):
            if interrupt.wait(pause):
                return False
            while last and step == total and config["hold"] and not self.fake.stopping.is_set():
                if interrupt.wait(0.01):
                    return False
            self.progress(node_id, "running", step, total)
            progress = {"value": step, "max": total, "node": node_id}
            self.send("progress", progress, broadcast=self.client is None)
        return True

    def fail(self, node_id: str, kind: str, details: dict, broadcast: bool) -> bool:
        at = {"prompt_id": self.prompt_id, "node_id": node_id}
        node_type = self.graph[node_id]["class_type"]
        self.message(
            kind,
            {**at, "node_type": node_type, "executed": list(self.executed), **details},
            broadcast,
        )
        return False

    def error_details(self) -> dict[str, Any]:
        return {
            "exception_message": self.fake.config["error"],
            "exception_type": "RuntimeError",
            "traceback": [TRACEBACK],
            "current_inputs": {},
            "current_outputs": list(self.signatures),
        }

    def send(self, kind: str, data: dict[str, Any], broadcast: bool = False) -> None:
        self.fake.emit(self.client, kind, {**data, "prompt_id": self.prompt_id}, broadcast)

    def progress(self, node_id: str, state: str, value: float, maximum: float) -> None:
        """Update the node's entry and send every started node's state, to every socket."""
        self.states[node_id] = {"value": value, "max": maximum, "state": state}
        nodes = {
            n: {
                **s,
                "node_id": n,
                "prompt_id": self.prompt_id,
                "display_node_id": n,
                "parent_node_id": None,
                "real_node_id": n,
            }
            for n, s in self.states.items()
        }
        self.fake.emit(None, "progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, True)

    def history(self, ok: bool) -> dict[str, Any]:
        """The history entry: the UI output the cache holds for each node of the prompt."""
        with self.fake.lock:
            outputs = {
                n: self.fake.cache[key]
                for n, key in self.signatures.items()
                if self.fake.cache.get(key)
            }
        return {
            "prompt": self.item,
            "outputs": outputs,
            "status": {
                "status_str": "success" if ok else "error",
                "completed": ok,
                "messages": self.messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in outputs
            },
        }


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
