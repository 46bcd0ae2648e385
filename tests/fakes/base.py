"""A scriptable fake HTTP server for provider fakes: threaded, in-process or as a subprocess."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
import traceback
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, urlsplit

CONTROL = "/__fake__/"


@dataclass
class Request:
    """One request as the fake saw it; `route` is the name of the route it matched."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    route: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, str]:
        """The fields of a multipart/form-data body (file parts decoded as text)."""
        head = f"Content-Type: {self.headers.get('content-type', '')}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + self.body)
        if not message.is_multipart():
            return {}
        fields = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        return fields


@dataclass
class Reply:
    """What the fake answers: a dict or list body is sent as JSON, str as text, bytes as is."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering, to provoke client timeouts

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reply:
        return cls(**{k: v for k, v in data.items() if k in ("status", "body", "headers", "delay")})


Behaviour = Reply | Callable[[Request], Reply]


class ThreadedServer:
    """An http.server on a daemon thread of its own: `url`, `start`, `stop`, `with`.

    Subclasses set `self._httpd` (a ThreadingHTTPServer) in their constructor.
    """

    _httpd: ThreadingHTTPServer

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        # A short poll interval keeps stop() (and so each test's teardown) fast.
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Listener(ThreadingHTTPServer):
    # A vendor's front door takes a burst of new connections: a SaaS node's first wave
    # opens one per thread, 100 at once. socketserver listens with a backlog of 5, and a
    # burst past it was refused now and then (a ConnectionError no real vendor gives).
    request_queue_size = 1024


class FakeServer(ThreadedServer):
    """Routes requests to `handle_<name>` methods, unless a scripted behaviour is queued first.

    Subclasses list `routes` as (method, path regex, name). Tests script the next answers of a
    route with `push(name, reply_or_callable, ...)`; a subprocess fake is scripted over HTTP
    with `POST /__fake__/push {"route", "reply"|"scenario", "args"}` and `POST /__fake__/config`.
    """

    routes: ClassVar[list[tuple[str, str, str]]] = []
    scenarios: ClassVar[tuple[str, ...]] = ("slow",)  # methods returning a Behaviour
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
        self.api_key = api_key  # None: any non-empty key is accepted
        self.config: dict[str, Any] = dict(self.defaults)
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self._scripted: dict[str, deque[Behaviour]] = defaultdict(deque)
        self._compiled = [(m, re.compile(p), n) for m, p, n in self.routes]
        self._httpd = _Listener((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a handler sleeping past a client timeout is fine
        self._httpd.fake = self  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.stopping.set()
        super().stop()

    def push(self, route: str, *behaviours: Behaviour) -> None:
        """Queue the next answers for `route`; once used up, the route behaves normally again."""
        with self.lock:
            self._scripted[route].extend(behaviours)

    def slow(self, seconds: float) -> Behaviour:
        """The route's normal answer, sent only after `seconds` (to provoke client timeouts)."""
        return lambda request: replace(
            getattr(self, f"handle_{request.route}")(request), delay=seconds
        )

    def received(self, route: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.route == route]

    def dispatch(self, request: Request) -> Reply:
        if request.path.startswith(CONTROL):
            return self._control(request)
        for method, pattern, name in self._compiled:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                request.route, request.params = name, match.groupdict()
                with self.lock:
                    self.requests.append(request)
                    scripted = self._scripted[name].popleft() if self._scripted[name] else None
                if scripted is not None:
                    return scripted(request) if callable(scripted) else scripted
                return getattr(self, f"handle_{name}")(request)
        return self.not_found(request)

    def not_found(self, request: Request) -> Reply:
        return Reply(404, {"error": f"no route for {request.method} {request.path}"})

    def _control(self, request: Request) -> Reply:
        command, data = request.path[len(CONTROL) :], request.json() or {}
        if command == "push":
            if "scenario" in data:
                if data["scenario"] not in self.scenarios:
                    return Reply(400, {"error": f"unknown scenario {data['scenario']}"})
                behaviour = getattr(self, data["scenario"])(**data.get("args", {}))
            else:
                behaviour = Reply.from_dict(data["reply"])
            self.push(data["route"], behaviour)
        elif command == "config":
            with self.lock:
                self.config.update(data)
        elif command == "requests":
            with self.lock:
                seen = [
                    {"route": r.route, "method": r.method, "path": r.path, "query": r.query}
                    for r in self.requests
                ]
            return Reply(200, seen)
        else:
            return Reply(404, {"error": f"unknown control {command}"})
        return Reply(204)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the vendors' servers do: a client's pooled connection is reused
    # (every reply carries its Content-Length, which HTTP/1.1 needs). The headers and the
    # body go out in two writes; without TCP_NODELAY the body would wait on the client's
    # delayed ACK (40 ms a reply) on a kept connection.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def handle(self) -> None:
        # A client closing its kept-alive connection (a worker stopped) is not news.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            super().handle()

    def _handle(self) -> None:
        fake: FakeServer = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        split = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=split.path,
            query=dict(parse_qsl(split.query)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        try:
            reply = fake.dispatch(request)
        except Exception:  # a bug in the fake must show as a 500, not a hung client
            fake.errors.append(traceback.format_exc())
            reply = Reply(500, {"error": "fake server bug", "trace": fake.errors[-1]})
        if reply.delay:
            fake.stopping.wait(reply.delay)
        payload, content_type = _encode(reply.body)
        try:
            self.send_response(reply.status)
            headers = {"Content-Type": content_type, **reply.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to tell it

    do_GET = do_POST = do_DELETE = do_PUT = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _encode(body: Any) -> tuple[bytes, str]:
    if isinstance(body, bytes):
        return body, "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return json.dumps(body).encode(), "application/json"


def bearer(request: Request) -> str:
    """The token of an `Authorization: Bearer` header, or ''."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else ""


def main(fake_class: type[FakeServer], argv: list[str] | None = None) -> None:
    """`python -m tests.fakes.<name> --port N`: serve until SIGTERM/SIGINT; prints the URL."""
    parser = argparse.ArgumentParser(description=fake_class.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    fake = fake_class(args.host, args.port, api_key=args.api_key).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(fake.url, flush=True)  # the parent reads this line to learn the port
    done.wait()
    fake.stop()
    sys.exit(0)
