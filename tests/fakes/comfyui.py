"""Fake ComfyUI: validated /prompt, a worker-run queue, history, /view, /interrupt (API-NOTES 6)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, ClassVar

from tests.fakes.base import FakeServer, Reply, Request, main
from tests.fakes.comfyui_graph import OUTPUT_NODES, canonical, error, validate
from tests.fakes.media import png_bytes

A = "(?:/api)?"  # every route is served at /<path> and /api/<path>


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
    # interrupt or for hold to be cleared; error: an exception message to fail prompts with.
    defaults: ClassVar = {
        "paused": False,
        "hold": False,
        "run_seconds": 0.02,
        "error": None,
        "checkpoints": ["sd_xl_base_1.0.safetensors"],
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

    def start(self) -> FakeComfyUI:
        super().start()
        self._worker.start()
        return self

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
            interrupted = self._interrupt.wait(self.config["run_seconds"])
            while self.config["hold"] and not interrupted and not self.stopping.is_set():
                interrupted = self._interrupt.wait(0.01)
            self._finish(item, started, interrupted)

    def _finish(self, item: list[Any], started: int, interrupted: bool) -> None:
        _, prompt_id, graph, _, output_ids = item
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


if __name__ == "__main__":
    main(FakeComfyUI)
