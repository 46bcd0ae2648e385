"""ComfyUI: workflows on the job's leased (or least-loaded) instance, polled by history."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import requests

from pipeline.provider import GenerationRequest, Output, OutputFile, Pending
from pipeline.provider_errors import (
    NotConfiguredError,
    ProviderError,
    RejectedError,
    TransientError,
)
from providers import comfyui_progress
from providers.comfyui_workflows import (
    DEFAULT_CHECKPOINT,
    SAMPLERS,
    SCHEDULERS,
    ListedFile,
    for_job,
    listed_files,
    sdxl_text_to_image,
    upstream,
)
from providers.http import HttpClient, Settings

log = logging.getLogger(__name__)

NAME = "comfyui"
DEFAULT_TIMEOUT = 30.0  # a local server; /prompt validates the graph before answering
WAIT_SLICE = 0.05  # how often a wait looks at the job's stop event and the socket's state
# Non-UUID job ids map onto stable UUIDs, so every job has one prompt id on every server.
PROMPT_NAMESPACE = uuid.UUID("6f1c8a52-4e0b-4c55-9a57-3c1d2b0e7a11")
# The folders of a path on the ComfyUI host (POSIX, drive or UNC, doubled backslashes too),
# followed by its last part. Not after a word character, ":" or a slash, so URLs, ratios and
# relative paths stay as they are.
_STOP = r"\s\\/'\"`,;:()\[\]{}<>|"
HOST_PATH = re.compile(
    rf"(?<![\w.:/\\])(?:[A-Za-z]:[\\/]+|\\\\+|/)(?:[^{_STOP}]+[\\/]+)+(?=[^{_STOP}])"
)


def prompt_id_for(job_id: str) -> str:
    """The ComfyUI prompt id of a job: the job id itself when it is a UUID."""
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return str(uuid.uuid5(PROMPT_NAMESPACE, job_id))


def client_id_for(job_id: str) -> str:
    """The websocket clientId of a job: the same in every process, so a restarted worker
    that reconnects with it hears the rest of the prompt's events."""
    return f"pipeline-{prompt_id_for(job_id)}"


def scrub_paths(text: str) -> str:
    """The text with the folders of the ComfyUI host's paths removed (file names kept)."""
    return HOST_PATH.sub("", text)


def _node_errors(nodes: Any) -> list[str]:
    """One line per input error of a `node_errors` map (API-NOTES 6.2)."""
    return [
        f"node {node_id} ({node.get('class_type')}): {e.get('message')}: {e.get('details')}"
        for node_id, node in (nodes.items() if isinstance(nodes, dict) else ())
        if isinstance(node, dict)
        for e in node.get("errors") or []
        if isinstance(e, dict)
    ]


def _describe(body: Any) -> tuple[list[str], str]:
    """A readable message from `{"error": {...}, "node_errors": {...}}` (or older shapes)."""
    if not isinstance(body, dict):
        return [], scrub_paths(str(body)[:300])
    error = body.get("error")
    if not isinstance(error, dict):  # older servers: {"error": "no prompt", "node_errors": []}
        return [], scrub_paths(str(error or body))
    parts = _node_errors(body.get("node_errors")) or [str(error.get("details"))]
    return [str(error.get("type"))], scrub_paths(f"{error.get('message')}: " + "; ".join(parts))


def _deliverable(files: list[ListedFile], content_type: str) -> list[ListedFile]:
    """The job's files: those of its kind, saved ones only unless there are none but previews."""
    wanted = [f for f in files if f.kind == content_type]
    if not wanted:
        made = sorted({f.mime_type for f in files})
        raise RejectedError(
            f"comfyui: the workflow made no {content_type}"
            + (f", only {len(files)} file(s) of {', '.join(made)}" if files else " file"),
            provider=NAME,
        )
    return [f for f in wanted if f.folder == "output"] or wanted


def _messages(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        m[0]: m[1]
        for m in status.get("messages") or []
        if isinstance(m, list) and len(m) == 2 and isinstance(m[1], dict)
    }


def _failure(messages: dict[str, dict[str, Any]]) -> RejectedError:
    """The error of a prompt whose history says it failed."""
    if "execution_interrupted" in messages:
        return RejectedError("comfyui: the prompt was interrupted", provider=NAME)
    failure = messages.get("execution_error", {})
    text = (
        f"comfyui: {failure.get('node_type')} (node {failure.get('node_id')}) failed: "
        f"{failure.get('exception_type')}: {failure.get('exception_message')}"
    )
    return RejectedError(scrub_paths(text)[:500], provider=NAME)


class ComfyUIProvider:
    """Self-hosted ComfyUI instances: free GPU time, so usage is counted in runs and outputs.

    Settings: `width`, `height`, `steps`, `seed`, `cfg`, `sampler`, `scheduler`,
    `negativePrompt`, `checkpoint` for the default SDXL graph, or `workflow`: the caller's
    own API-format graph (required for video and audio).
    Remote ids are "<instance base URL>|<prompt id>". Every output node of a submitted graph
    is made unique to the job (see comfyui_workflows.for_job), so no file comes from a cache.
    While a prompt runs, `check` reports its progress (0..1) from the instance's websocket,
    opened with the job's clientId (`client_id_for`); None where there is none.
    `client_id` is accepted for older wiring and not used: clientIds are per job.
    """

    name = NAME
    content_types = frozenset({"image", "video", "audio"})

    def __init__(
        self,
        base_urls: Sequence[str] | str,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
        client_id: str | None = None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise NotConfiguredError("comfyui: no instance URLs configured", provider=NAME)
        self.timeout = timeout
        self._session = session or requests.Session()
        self._instances = {url.rstrip("/"): self._client(url) for url in urls}

    def __repr__(self) -> str:
        return f"ComfyUIProvider({list(self._instances)!r})"

    def instances(self) -> list[str]:
        """The configured base URLs (no trailing slash), in configuration order."""
        return list(self._instances)

    def instance_of(self, remote_id: str) -> str:
        """The base URL a remote id lives on (even one no longer configured)."""
        url, bar, prompt_id = remote_id.rpartition("|")
        if not (bar and url and prompt_id):
            raise ValueError(f"not a ComfyUI remote id: {remote_id!r}")
        return url.rstrip("/")

    def _client(self, url: str) -> HttpClient:
        return HttpClient(
            NAME, url, timeout=self.timeout, session=self._session, describe=_describe
        )

    def _at(self, remote_id: str) -> tuple[HttpClient, str]:
        """The instance a remote id points at and its prompt."""
        url = self.instance_of(remote_id)
        return self._instances.get(url) or self._client(url), remote_id.rpartition("|")[2]

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
        )

    def estimate_usage(self, content_type: str, prompt: str, settings: dict) -> dict[str, float]:
        self._workflow(content_type, prompt, settings)
        return {"runs": 1}

    # Submitting -----------------------------------------------------------------------------

    def start(self, request: GenerationRequest) -> Pending:
        """Submit the job's graph: on `request.instance` when given, else the least loaded.

        A restarted worker calls start again, so the job's prompt is first looked for on
        every instance (history and queue); one found is returned, never submitted twice.
        """
        graph = self._workflow(
            request.content_type, request.prompt, request.settings, request.job_id
        )
        leased = self._leased(request.instance)
        prompt_id = prompt_id_for(request.job_id)
        found, loads = self._find(request.job_id, prompt_id)
        if found is not None:
            return found
        if leased is not None and leased not in loads:
            raise TransientError(f"comfyui: {leased} did not answer", provider=NAME)
        if not loads:
            raise TransientError("comfyui: no instance answered", provider=NAME)
        # Ties go to the first configured instance.
        url = leased or min(loads, key=loads.__getitem__)
        return self._submit(url, for_job(graph, prompt_id), request.job_id, prompt_id)

    def _leased(self, instance: str | None) -> str | None:
        if instance is None:
            return None
        url = instance.rstrip("/")
        if url not in self._instances:
            raise NotConfiguredError(
                f"comfyui: {instance} is not one of the configured instances", provider=NAME
            )
        return url

    def _find(self, job_id: str, prompt_id: str) -> tuple[Pending | None, dict[str, int]]:
        """(the prompt where an instance has it, or None; queue length per answering instance)."""
        loads: dict[str, int] = {}
        for url, http in self._instances.items():
            try:
                if self._history(http, prompt_id):
                    return Pending(f"{url}|{prompt_id}", 1.0, "completed"), loads
                queue = self._queue(http)
            except TransientError as exc:
                # Availability over strictness: a job on a dead instance may run twice.
                log.warning("comfyui instance %s skipped: %s", url, exc.message)
                continue
            if prompt_id in queue:
                state, item = queue[prompt_id]
                progress = self._progress(http, job_id, prompt_id, item)
                return Pending(f"{url}|{prompt_id}", progress, state), loads
            loads[url] = len(queue)
        return None, loads

    def _submit(self, url: str, graph: dict[str, Any], job_id: str, prompt_id: str) -> Pending:
        http = self._instances[url]
        body = {"prompt": graph, "client_id": client_id_for(job_id), "prompt_id": prompt_id}
        answer = http.json(http.send("POST", "/prompt", json=body))
        # Older servers ignore our prompt_id and make their own; theirs is the one to poll.
        prompt_id = str(answer.get("prompt_id") or prompt_id)
        if answer.get("node_errors"):
            # ComfyUI queued the outputs that validated and dropped the others: not this job.
            self._withdraw(http, prompt_id)
            raise RejectedError(
                scrub_paths(
                    "comfyui: workflow outputs failed validation: "
                    + "; ".join(_node_errors(answer["node_errors"]) or ["(no details)"])
                )[:500],
                provider=NAME,
            )
        self._progress(http, job_id, prompt_id)  # listen from now on
        return Pending(f"{url}|{prompt_id}", 0.0, "queued")

    def _withdraw(self, http: HttpClient, prompt_id: str) -> None:
        """Remove a prompt we will not use; failing that, it runs unwatched (logged)."""
        try:
            self._remove(http, prompt_id)
        except ProviderError as exc:
            log.warning("comfyui prompt %s left on %s: %s", prompt_id, http.base_url, exc)

    def _history(self, http: HttpClient, prompt_id: str) -> dict[str, Any]:
        return http.json(http.send("GET", f"/history/{prompt_id}")).get(prompt_id) or {}

    def _queue(self, http: HttpClient) -> dict[str, tuple[str, list]]:
        """prompt id -> ("running" or "queued", its queue item), for the instance's queue."""
        queue = http.json(http.send("GET", "/queue"))
        return {
            item[1]: (state, item)
            for key, state in (("queue_pending", "queued"), ("queue_running", "running"))
            for item in queue.get(key) or []
            if isinstance(item, list) and len(item) > 1
        }

    # Polling --------------------------------------------------------------------------------

    def check(self, request: GenerationRequest, remote_id: str) -> Output | Pending:
        http, prompt_id = self._at(remote_id)
        entry = self._history(http, prompt_id)
        if not entry:
            queue = self._queue(http)
            if prompt_id in queue:
                state, item = queue[prompt_id]
                progress = self._progress(http, request.job_id, prompt_id, item)
                return Pending(remote_id, progress, state)
            entry = self._history(http, prompt_id)  # it may have finished between the calls
        comfyui_progress.close(http.base_url, client_id_for(request.job_id))  # over, or gone
        if not entry:
            # Queue and history live in memory: a restarted instance forgets its prompts.
            # Not resubmitted here, so a cancelled job can never come back to life.
            raise RejectedError(
                f"comfyui: {http.base_url} does not know prompt {prompt_id} (restarted or deleted)",
                provider=NAME,
            )
        return self._result(http, request.content_type, prompt_id, entry)

    def _progress(
        self, http: HttpClient, job_id: str, prompt_id: str, item: list | None = None
    ) -> float | None:
        """The websocket's progress over the graph the queue item runs: a hint, never raises."""
        try:
            expected = upstream(item[2], item[4]) if item else set()
            listener = comfyui_progress.listener(
                http.base_url, client_id_for(job_id), min(self.timeout, 5.0)
            )
            return listener.progress(prompt_id, expected)
        except Exception as exc:  # e.g. no thread to be had, an odd queue item
            log.debug("comfyui progress for %s unavailable: %s", prompt_id, exc)
            return None

    def _result(
        self, http: HttpClient, content_type: str, prompt_id: str, entry: dict[str, Any]
    ) -> Output:
        status = entry.get("status") or {}
        messages = _messages(status)
        if status.get("status_str") == "error":
            raise _failure(messages)
        files = _deliverable(listed_files(entry.get("outputs")), content_type)
        cached = set(messages.get("execution_cached", {}).get("nodes") or ())
        reused = sorted({f.node_id for f in files} & cached)
        if reused:  # for_job makes this impossible; should it happen, never hand them out
            raise RejectedError(
                f"comfyui: output node(s) {', '.join(reused)} came from another prompt's cache",
                provider=NAME,
            )
        first, *rest = [(f, self._download(http, f)) for f in files]
        started = messages.get("execution_start", {}).get("timestamp")
        finished = messages.get("execution_success", {}).get("timestamp")
        seconds = (finished - started) / 1000 if started and finished else None
        metadata = {
            "prompt_id": prompt_id,
            "instance": http.base_url,
            "filename": first[0].filename,
            "subfolder": first[0].subfolder,
            "files": len(files),
            "execution_seconds": seconds,
        }
        return Output(
            first[1],
            first[0].mime_type,
            first[0].extension,
            {"runs": 1, "outputs": len(files)},
            metadata,
            tuple(OutputFile(data, f.mime_type, f.extension, _about(f)) for f, data in rest),
        )

    def _download(self, http: HttpClient, file: ListedFile) -> bytes:
        params = {"filename": file.filename, "subfolder": file.subfolder, "type": file.folder}
        response = http.send("GET", "/view", params=params, allow=(404,))
        if response.status_code == 404:  # deleted from the instance's disk since
            raise RejectedError(
                f"comfyui: {http.base_url} no longer has {file.filename}", provider=NAME
            )
        return response.content

    # Waiting --------------------------------------------------------------------------------

    def wait(
        self,
        request: GenerationRequest,
        remote_id: str,
        seconds: float,
        *,
        fallback: float,
        stop: threading.Event,
    ) -> None:
        """Return as soon as the prompt may have ended, for `check` to read /history.

        With the job's websocket up, that is its `executing` with node null (sent after the
        history entry is written), or `seconds` at most. Without it, or when it connects or
        drops meanwhile (events may have been missed), `fallback` seconds: a short poll of
        our own server. Also returns when `stop` is set (the job ended elsewhere).
        """
        http, prompt_id = self._at(remote_id)
        try:
            listener = comfyui_progress.listener(
                http.base_url, client_id_for(request.job_id), min(self.timeout, 5.0)
            )
            ended = listener.ended(prompt_id)
        except Exception as exc:  # no thread to be had: poll
            log.debug("comfyui websocket for %s unavailable: %s", prompt_id, exc)
            stop.wait(min(seconds, fallback))
            return
        if ended.is_set():  # heard, yet /history said otherwise (an older server): poll
            stop.wait(min(seconds, fallback))
            return
        give_up_at = time.monotonic() + (seconds if listener.connected else min(seconds, fallback))
        connections = listener.connections
        while not stop.is_set():
            left = give_up_at - time.monotonic()
            if left <= 0 or ended.wait(min(WAIT_SLICE, left)):
                return
            if listener.connections != connections:
                return

    # Cancelling -----------------------------------------------------------------------------

    def cancel(self, request: GenerationRequest, remote_id: str) -> None:
        http, prompt_id = self._at(remote_id)
        try:
            self._remove(http, prompt_id)
        finally:
            comfyui_progress.close(http.base_url, client_id_for(request.job_id))

    def _remove(self, http: HttpClient, prompt_id: str) -> None:
        """Queued: delete it from the queue. Running: interrupt it (that prompt only)."""
        state = self._queue(http).get(prompt_id, ("",))[0]
        if state == "queued":
            http.send("POST", "/queue", json={"delete": [prompt_id]})
            state = self._queue(http).get(prompt_id, ("",))[0]  # it may have started meanwhile
        if state == "running":
            # Older servers ignore the body and stop whatever runs, so only when it is ours.
            http.send("POST", "/interrupt", json={"prompt_id": prompt_id})


def _about(file: ListedFile) -> dict[str, Any]:
    return {"filename": file.filename, "subfolder": file.subfolder, "node": file.node_id}
