"""ComfyUI: workflows on the least-loaded of several instances, polled by history (API-NOTES 6)."""

from __future__ import annotations

import logging
import mimetypes
import uuid
from collections.abc import Sequence
from typing import Any

import requests

from pipeline.provider import GenerationRequest, Output, Pending
from pipeline.provider_errors import NotConfiguredError, RejectedError, TransientError
from providers import comfyui_progress
from providers.comfyui_workflows import (
    DEFAULT_CHECKPOINT,
    SAMPLERS,
    SCHEDULERS,
    sdxl_text_to_image,
)
from providers.http import HttpClient, Settings

log = logging.getLogger(__name__)

NAME = "comfyui"
DEFAULT_TIMEOUT = 30.0  # a local server; /prompt validates the graph before answering
# Our job ids map onto ComfyUI prompt ids, which must be canonical UUIDs.
PROMPT_NAMESPACE = uuid.UUID("6f1c8a52-4e0b-4c55-9a57-3c1d2b0e7a11")
MEDIA_KEYS = ("images", "gifs", "videos", "audio")  # where output nodes list their files


def prompt_id_for(job_id: str) -> str:
    """The ComfyUI prompt id of a job: the job id itself when it is a UUID."""
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return str(uuid.uuid5(PROMPT_NAMESPACE, job_id))


def _describe(body: Any) -> tuple[list[str], str]:
    """A readable message from `{"error": {...}, "node_errors": {...}}` (or older shapes)."""
    if not isinstance(body, dict):
        return [], str(body)[:300]
    error, nodes = body.get("error"), body.get("node_errors")
    if not isinstance(error, dict):  # older servers: {"error": "no prompt", "node_errors": []}
        return [], str(error or body)
    parts = [
        f"node {node_id} ({node.get('class_type')}): {e.get('message')}: {e.get('details')}"
        for node_id, node in (nodes.items() if isinstance(nodes, dict) else ())
        for e in node.get("errors", [])
    ]
    message = f"{error.get('message')}: " + "; ".join(parts or [str(error.get("details"))])
    return [str(error.get("type"))], message


class ComfyUIProvider:
    """Self-hosted ComfyUI instances: free GPU time, so usage is counted in runs.

    Settings: `width`, `height`, `steps`, `seed`, `cfg`, `sampler`, `scheduler`,
    `negativePrompt`, `checkpoint` for the default SDXL graph, or `workflow`: the caller's
    own API-format graph (required for video and audio).
    Remote ids are "<instance base URL>|<prompt id>".
    While a prompt runs, `check` reports its progress (0..1) from the instance's websocket,
    opened with our `client_id` (the one sent with each prompt); None where there is none.
    """

    name = NAME
    content_types = frozenset({"image", "video", "audio"})

    def __init__(
        self,
        base_urls: Sequence[str] | str,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
        client_id: str = "content-pipeline",
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise NotConfiguredError("comfyui: no instance URLs configured", provider=NAME)
        self.timeout, self.client_id = timeout, client_id
        self._session = session or requests.Session()
        self._instances = {url.rstrip("/"): self._client(url) for url in urls}

    def __repr__(self) -> str:
        return f"ComfyUIProvider({list(self._instances)!r})"

    def _client(self, url: str) -> HttpClient:
        return HttpClient(
            NAME, url, timeout=self.timeout, session=self._session, describe=_describe
        )

    def _at(self, remote_id: str) -> tuple[HttpClient, str]:
        """The instance a remote id points at (even one no longer configured) and its prompt."""
        url, _, prompt_id = remote_id.rpartition("|")
        return self._instances.get(url) or self._client(url), prompt_id

    def _workflow(
        self, request_type: str, prompt: str, settings: dict, job_id: str = ""
    ) -> dict[str, Any]:
        if request_type not in self.content_types:
            raise RejectedError(f"comfyui: cannot make {request_type}", provider=NAME)
        s = Settings(NAME, settings)
        graph = settings.get("workflow")
        if graph is not None:
            if not (
                isinstance(graph, dict)
                and graph
                and all(
                    isinstance(n, dict)
                    and isinstance(n.get("class_type"), str)
                    and isinstance(n.get("inputs", {}), dict)
                    for n in graph.values()
                )
            ):
                raise s.reject("workflow", "an API-format graph (ComfyUI's Export (API))")
            return graph
        if request_type != "image":
            raise s.reject(
                "workflow", f"given: the default graph only makes images, not {request_type}"
            )
        sides = {}
        for side in ("width", "height"):
            sides[side] = s.integer(side, 1024, 64, 4096)
            if sides[side] % 8:
                raise s.reject(side, "a multiple of 8")
        # Without a seed, one derived from the job keeps a resubmitted job's image the same.
        default_seed = uuid.UUID(prompt_id_for(job_id)).int % 2**32 if job_id else 0
        return sdxl_text_to_image(
            prompt,
            negative=s.text("negativePrompt", "", 10_000),
            **sides,
            steps=s.integer("steps", 25, 1, 150),
            seed=s.integer("seed", default_seed, 0, 2**64 - 1),
            cfg=s.number("cfg", 7.0, 0.0, 30.0),
            sampler=s.choice("sampler", "euler", SAMPLERS),
            scheduler=s.choice("scheduler", "normal", SCHEDULERS),
            checkpoint=s.text("checkpoint", DEFAULT_CHECKPOINT, 255),
            filename_prefix=f"pipeline/{job_id or 'job'}",
        )

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        self._workflow(content_type, prompt, settings)
        return {"runs": 1}

    def start(self, request: GenerationRequest) -> Pending:
        workflow = self._workflow(
            request.content_type, request.prompt, request.settings, request.job_id
        )
        prompt_id = prompt_id_for(request.job_id)
        loads: dict[str, int] = {}
        # A restarted worker calls start again: find the job on any instance before submitting.
        for url, http in self._instances.items():
            try:
                if self._history(http, prompt_id):
                    return Pending(f"{url}|{prompt_id}", 1.0, "completed")
                queue = self._queue(http)
            except TransientError as exc:
                # Availability over strictness: a job on a dead instance may run twice.
                log.warning("comfyui instance %s skipped: %s", url, exc.message)
                continue
            if prompt_id in queue:
                return Pending(f"{url}|{prompt_id}", None, queue[prompt_id])
            loads[url] = len(queue)
        if not loads:
            raise TransientError("comfyui: no instance answered", provider=NAME)
        url = min(loads, key=loads.__getitem__)  # ties go to the first configured instance
        http = self._instances[url]
        body = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id}
        answer = http.json(http.send("POST", "/prompt", json=body))
        # Older servers ignore our prompt_id and make their own; theirs is the one to poll.
        prompt_id = answer.get("prompt_id") or prompt_id
        self._progress(http, prompt_id)  # listen from now: ComfyUI keeps no progress for later
        return Pending(f"{url}|{prompt_id}", 0.0, "queued")

    def _history(self, http: HttpClient, prompt_id: str) -> dict[str, Any]:
        return http.json(http.send("GET", f"/history/{prompt_id}")).get(prompt_id) or {}

    def _queue(self, http: HttpClient) -> dict[str, str]:
        """prompt id -> "running" or "queued", for everything on the instance's queue."""
        queue = http.json(http.send("GET", "/queue"))
        return {
            item[1]: state
            for key, state in (("queue_pending", "queued"), ("queue_running", "running"))
            for item in queue.get(key) or []
            if isinstance(item, list) and len(item) > 1
        }

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        http, prompt_id = self._at(remote_id)
        entry = self._history(http, prompt_id)
        if not entry:
            queue = self._queue(http)
            if prompt_id in queue:
                return Pending(remote_id, self._progress(http, prompt_id), queue[prompt_id])
            entry = self._history(http, prompt_id)  # it may have finished between the calls
        if not entry:
            # Queue and history live in memory: a restarted instance forgets its prompts.
            # Not resubmitted here, so a cancelled job can never come back to life.
            raise RejectedError(
                f"comfyui: {http.base_url} does not know prompt {prompt_id} (restarted or deleted)",
                provider=NAME,
            )
        comfyui_progress.forget(http.base_url, self.client_id, prompt_id)
        return self._result(http, request.content_type, prompt_id, entry)

    def _progress(self, http: HttpClient, prompt_id: str) -> float | None:
        """The websocket's latest progress for the prompt, or None: a hint that never raises."""
        try:
            listener = comfyui_progress.listener(
                http.base_url, self.client_id, min(self.timeout, 5.0)
            )
            return listener.progress(prompt_id)
        except Exception as exc:  # e.g. no thread to be had: polling still works
            log.debug("comfyui progress for %s unavailable: %s", prompt_id, exc)
            return None

    def _result(
        self, http: HttpClient, content_type: str, prompt_id: str, entry: dict[str, Any]
    ) -> Output:
        status = entry.get("status") or {}
        messages = {m[0]: m[1] for m in status.get("messages", []) if len(m) == 2}
        if status.get("status_str") == "error":
            if "execution_interrupted" in messages:
                raise RejectedError("comfyui: the prompt was interrupted", provider=NAME)
            failure = messages.get("execution_error", {})
            raise RejectedError(
                f"comfyui: {failure.get('node_type')} (node {failure.get('node_id')}) failed: "
                f"{failure.get('exception_type')}: {failure.get('exception_message')}"[:500],
                provider=NAME,
            )
        files = [
            item
            for node in (entry.get("outputs") or {}).values()
            for key in MEDIA_KEYS
            for item in node.get(key, [])
            if isinstance(item, dict) and "filename" in item
        ]
        # Saved outputs before temp previews; then a file of the requested kind first.
        files.sort(
            key=lambda f: (
                f.get("type") != "output",
                not (mimetypes.guess_type(f["filename"])[0] or "").startswith(content_type),
            )
        )
        if not files:
            raise RejectedError("comfyui: the workflow produced no output file", provider=NAME)
        chosen = files[0]
        response = http.send(
            "GET",
            "/view",
            params={
                "filename": chosen["filename"],
                "subfolder": chosen.get("subfolder", ""),
                "type": chosen.get("type", "output"),
            },
        )
        mime = (
            mimetypes.guess_type(chosen["filename"])[0]
            or response.headers.get("Content-Type", "").split(";")[0]
            or "application/octet-stream"
        )
        started = messages.get("execution_start", {}).get("timestamp")
        finished = messages.get("execution_success", {}).get("timestamp")
        seconds = (finished - started) / 1000 if started and finished else None
        return Output(
            response.content,
            mime,
            chosen["filename"].rpartition(".")[2].lower(),
            {"runs": 1},
            {
                "prompt_id": prompt_id,
                "instance": http.base_url,
                "filename": chosen["filename"],
                "files": len(files),
                "execution_seconds": seconds,
            },
        )

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        http, prompt_id = self._at(remote_id)
        state = self._queue(http).get(prompt_id)
        if state == "queued":
            http.send("POST", "/queue", json={"delete": [prompt_id]})
            state = self._queue(http).get(prompt_id)  # it may have started meanwhile
        if state == "running":
            # Older servers ignore the body and stop whatever runs, so only when it is ours.
            http.send("POST", "/interrupt", json={"prompt_id": prompt_id})
