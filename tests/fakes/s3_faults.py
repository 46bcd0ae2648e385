"""An HTTP proxy in front of an S3 endpoint (moto) that fails PutObject requests on demand.

Every request goes through unchanged (method, path, query, headers, body), Host included:
boto3 signs for the proxy's host, and the signature stays valid for a server that checks.
`fail_puts(n)` answers the next n PutObject requests (PUT on an object key; bucket
creation, copies and sub-resources such as ?tagging pass) with a real S3 XML error.

In a test: `with S3FaultProxy(s3_server) as proxy:` then `S3_ENDPOINT_URL=proxy.url` and
`proxy.fail_puts(5)`. From another process, over HTTP (S3 bucket names cannot contain
underscores, so the control paths never clash with a bucket):

    POST /__faults__/fail_puts {"count": 5, "code": "SlowDown"}    -> the counts
    GET  /__faults__/counts  -> {"failed_puts", "forwarded_puts", "pending_failures"}
    POST /__faults__/reset

or `python -m tests.fakes.s3_faults --target URL` to run it as a process of its own.
Bucket and key are read path-style, as boto3 addresses an endpoint given by IP address.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from urllib.request import Request, urlopen
from xml.sax.saxutils import escape

from tests.fakes.base import ThreadedServer

CONTROL = "/__faults__/"

# The S3 errors the proxy can answer with: status, reason phrase, message (as S3 words them).
S3_FAULTS: dict[str, tuple[int, str, str]] = {
    "SlowDown": (503, "Slow Down", "Please reduce your request rate."),
    "InternalError": (500, "Internal Server Error",
                      "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service Unavailable", "Please reduce your request rate."),
}

# Hop-by-hop headers belong to one connection, not to the request (RFC 9110 7.6.1).
# Expect is answered by the proxy itself (100 Continue); botocore never signs it.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                         "te", "trailer", "upgrade", "expect"})


class S3FaultProxy(ThreadedServer):
    """Forwards to `target_url`; fails the next PutObject requests when told to."""

    def __init__(self, target_url: str, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 60):
        target = urlsplit(target_url)
        self.target_host = target.hostname or "127.0.0.1"
        self.target_port = target.port or 80
        self.timeout = timeout  # for each forwarded request, so a stuck target fails the test
        self.lock = threading.Lock()
        self._pending: list[str] = []  # the codes of the failures still to give
        self.failed_puts = 0
        self.forwarded_puts = 0
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # boto3 keeps idle connections open
        self._httpd.proxy = self  # type: ignore[attr-defined]

    def fail_puts(self, count: int, code: str = "SlowDown") -> None:
        """Answer the next `count` PutObject requests with the S3 error `code`."""
        if code not in S3_FAULTS:
            raise ValueError(f"unknown fault {code!r}; one of {sorted(S3_FAULTS)}")
        with self.lock:
            self._pending.extend([code] * count)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"failed_puts": self.failed_puts, "forwarded_puts": self.forwarded_puts,
                    "pending_failures": len(self._pending)}

    def reset(self) -> None:
        with self.lock:
            self._pending.clear()
            self.failed_puts = self.forwarded_puts = 0

    def take_put_fault(self) -> str | None:
        """The fault for this PutObject, or None (and it is counted as forwarded)."""
        with self.lock:
            if self._pending:
                self.failed_puts += 1
                return self._pending.pop(0)
            self.forwarded_puts += 1
            return None

    def control(self, method: str, command: str, body: bytes) -> tuple[int, Any]:
        data = json.loads(body or b"{}")
        if method == "POST" and command == "fail_puts":
            try:
                self.fail_puts(int(data["count"]), data.get("code", "SlowDown"))
            except (KeyError, TypeError, ValueError) as exc:
                return 400, {"error": str(exc)}
        elif method == "POST" and command == "reset":
            self.reset()
        elif not (method == "GET" and command == "counts"):
            return 404, {"error": f"unknown control {method} {command}"}
        return 200, self.counts()


def is_put_object(method: str, target: str, headers) -> bool:
    """PUT /bucket/key, not a bucket (PUT /bucket), a copy or a sub-resource (?tagging)."""
    if method != "PUT":
        return False
    split = urlsplit(target)
    bucket, _, key = split.path.lstrip("/").partition("/")
    subresources = {name for name, _ in parse_qsl(split.query, keep_blank_values=True)}
    return bool(bucket and key) and not (subresources - {"x-id"}) \
        and "x-amz-copy-source" not in headers


def s3_error_body(code: str, message: str, resource: str) -> bytes:
    """The XML body S3 sends with an error, with request ids like S3's."""
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId>"
        f"<HostId>{uuid.uuid4().hex}</HostId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 as S3 speaks it: boto3 keeps connections alive and sends large bodies only
    # after a 100 Continue, which BaseHTTPRequestHandler gives for HTTP/1.1 only.
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle kept-alive connection is closed, its thread ends

    def _handle(self) -> None:
        proxy: S3FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        path = urlsplit(self.path).path
        if path.startswith(CONTROL):
            status, data = proxy.control(self.command, path[len(CONTROL):], body)
            payload = json.dumps(data).encode()
            self._reply(status, "", [("Content-Type", "application/json")], payload)
            return
        fault = proxy.take_put_fault() if is_put_object(self.command, self.path, self.headers) \
            else None
        if fault:
            status, reason, message = S3_FAULTS[fault]
            headers = [("Content-Type", "application/xml"),
                       ("x-amz-request-id", uuid.uuid4().hex[:16].upper())]
            self._reply(status, reason, headers, s3_error_body(fault, message, path))
            return
        self._forward(proxy, body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _read_body(self) -> bytes:
        """The body as sent, chunked framing and all, so it can be sent on unchanged."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                raw += self.rfile.read(size + 2)  # the chunk and its CRLF
            while True:  # trailer fields, then the empty line
                line = self.rfile.readline()
                raw += line
                if line in (b"\r\n", b"\n", b""):
                    return bytes(raw)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, proxy: S3FaultProxy, body: bytes) -> None:
        upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port,
                                              timeout=proxy.timeout)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            payload = response.read()
            status, reason, headers = response.status, response.reason, response.getheaders()
        except OSError as exc:
            message = f"proxy could not reach {proxy.target_host}:{proxy.target_port}: {exc}"
            self._reply(502, "Bad Gateway", [("Content-Type", "text/plain")], message.encode())
            return
        finally:
            upstream.close()
        bodiless = self.command == "HEAD" or status in (204, 304)
        kept = [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP
                and n.lower() != "transfer-encoding"
                and (bodiless or n.lower() != "content-length")]
        self._reply(status, reason, kept, b"" if bodiless else payload, sized=not bodiless)

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
               *, sized: bool = True) -> None:
        try:
            # send_response_only: no second Server and Date beside the target's own.
            self.send_response_only(status, reason or None)
            for name, value in headers:
                self.send_header(name, value)
            if sized:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up; nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:
        pass


def fail_puts_at(proxy_url: str, count: int, code: str = "SlowDown") -> dict[str, int]:
    """`S3FaultProxy.fail_puts` from another process; returns the counts."""
    return _control(proxy_url, "fail_puts", {"count": count, "code": code})


def counts_at(proxy_url: str) -> dict[str, int]:
    """`S3FaultProxy.counts` from another process."""
    return _control(proxy_url, "counts")


def _control(proxy_url: str, command: str, data: dict | None = None) -> dict[str, int]:
    body = None if data is None else json.dumps(data).encode()
    url = f"{proxy_url.rstrip('/')}{CONTROL}{command}"
    if not url.startswith("http://"):
        raise ValueError(f"not a proxy URL: {proxy_url!r}")
    request = Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    with urlopen(request, timeout=10) as response:  # noqa: S310 (checked above: http only)
        return json.load(response)


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.fakes.s3_faults --target URL`: serve until SIGTERM; prints the URL."""
    parser = argparse.ArgumentParser(description=S3FaultProxy.__doc__)
    parser.add_argument("--target", required=True, help="the S3 endpoint to forward to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = S3FaultProxy(args.target, args.host, args.port).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(proxy.url, flush=True)  # the parent reads this line to learn the port
    done.wait()
    proxy.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
