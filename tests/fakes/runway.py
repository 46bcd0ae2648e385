"""Fake Runway developer API: task submit, polling, cancel and signed downloads (API-NOTES 4)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, ClassVar

from tests.fakes.base import Behaviour, FakeServer, Reply, Request, bearer, main
from tests.fakes.media import mp4_bytes, png_bytes

VERSION = "2024-11-06"
ID = r"(?P<id>[0-9a-f-]+)"
REQUIRED = {
    "text_to_video": ("model", "promptText", "ratio", "duration"),
    "image_to_video": ("model", "promptImage", "ratio"),
    "text_to_image": ("model", "promptText", "ratio"),
}


class FakeRunway(FakeServer):
    """Fake Runway: tasks go PENDING -> RUNNING -> outcome, one stage per poll."""

    routes: ClassVar = [
        ("POST", r"/v1/(?P<kind>text_to_video|image_to_video|text_to_image)", "submit"),
        ("GET", f"/v1/tasks/{ID}", "task"),
        ("DELETE", f"/v1/tasks/{ID}", "delete"),
        ("GET", r"/cdn/(?P<name>[^/]+)", "download"),
    ]
    scenarios = (*FakeServer.scenarios, "error", "daily_limit", "out_of_credits")
    # outcome: SUCCEEDED | FAILED; throttled: start THROTTLED; cancel_spelling: either spelling.
    defaults: ClassVar = {
        "polls_to_finish": 2,
        "outcome": "SUCCEEDED",
        "failure_code": "INTERNAL",
        "throttled": False,
        "cancel_spelling": "CANCELLED",
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tasks: dict[str, dict[str, Any]] = {}

    def error(self, status: int, message: str = "error", headers: dict | None = None) -> Behaviour:
        return Reply(status, {"error": message}, headers or {})

    def daily_limit(self) -> Behaviour:
        return self.error(429, "You have exceeded your daily generation limit.")

    def out_of_credits(self) -> Behaviour:
        return self.error(400, "You do not have enough credits to run this task.")

    def _refuse(self, request: Request) -> Reply | None:
        token = bearer(request)
        if not token or (self.api_key is not None and token != self.api_key):
            return Reply(401, {"error": f"Invalid API key: {token}"})
        if request.headers.get("x-runway-version") != VERSION:
            return Reply(400, {"error": "X-Runway-Version header must be set to a valid version"})
        return None

    def handle_submit(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        body, kind = request.json() or {}, request.params["kind"]
        missing = [name for name in REQUIRED[kind] if body.get(name) in (None, "")]
        if missing:
            return Reply(400, {"error": f"Validation of body failed: {missing[0]} is required"})
        task_id = str(uuid.uuid4())
        with self.lock:
            self.tasks[task_id] = {
                "id": task_id,
                "kind": kind,
                "body": body,
                "polls": 0,
                "outcome": self.config["outcome"],
                "created": "2024-06-27T19:49:32.334Z",
                "status": "THROTTLED" if self.config["throttled"] else "PENDING",
            }
        return Reply(200, {"id": task_id})

    def handle_task(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        with self.lock:
            task = self.tasks.get(request.params["id"])
            if task is None:
                return Reply(404, {"error": "Task not found"})
            if task["status"] != self.config["cancel_spelling"]:
                self._advance(task)
            return Reply(200, self._view(task))

    def _advance(self, task: dict[str, Any]) -> None:
        if task["status"] == "THROTTLED" and self.config["throttled"]:
            return  # over the concurrency limit: Runway holds it until a slot frees
        task["polls"] += 1
        if task["polls"] >= self.config["polls_to_finish"]:
            task["status"] = task["outcome"]
        elif task["status"] not in ("SUCCEEDED", "FAILED"):
            task["status"] = "RUNNING"

    def _view(self, task: dict[str, Any]) -> dict[str, Any]:
        view = {"id": task["id"], "createdAt": task["created"], "status": task["status"]}
        if task["status"] == "RUNNING":
            view["progress"] = 0.5
        elif task["status"] == "SUCCEEDED":
            suffix = "png" if task["kind"] == "text_to_image" else "mp4"
            view["output"] = [f"{self.url}/cdn/{task['id']}.{suffix}?_jwt={_sign(task['id'])}"]
        elif task["status"] == "FAILED":
            view.update(failure="The generation failed.", failureCode=self.config["failure_code"])
        return view

    def handle_delete(self, request: Request) -> Reply:
        if refused := self._refuse(request):
            return refused
        with self.lock:
            task = self.tasks.get(request.params["id"])
            if task is None:
                return Reply(404, {"error": "Task not found"})
            if task["status"] in ("SUCCEEDED", "FAILED"):
                del self.tasks[task["id"]]  # deleting a finished task removes it
            else:
                task["status"] = self.config["cancel_spelling"]
        return Reply(204)

    def handle_download(self, request: Request) -> Reply:
        task_id, _, suffix = request.params["name"].rpartition(".")
        if request.query.get("_jwt") != _sign(task_id) or task_id not in self.tasks:
            return Reply(403, "<Error><Code>AccessDenied</Code></Error>")
        if suffix == "png":
            return Reply(200, png_bytes(12, 12, (0, 200, 0)), {"Content-Type": "image/png"})
        return Reply(200, mp4_bytes(task_id), {"Content-Type": "video/mp4"})


def _sign(task_id: str) -> str:
    return hashlib.sha256(f"fake-cdn:{task_id}".encode()).hexdigest()[:16]


if __name__ == "__main__":
    main(FakeRunway)
