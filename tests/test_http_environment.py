"""The provider HTTP client and the process's proxy settings: read once for the vendor's
own host, per call for any other (signed download URLs), and NO_PROXY honoured."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.provider_errors import TransientError
from providers.http import HttpClient


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself, naming the URL it was asked for."""

    def do_GET(self):
        self.server.seen.append(self.path)
        body = b'{"via": "proxy"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.seen = []
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _client(base_url: str) -> HttpClient:
    return HttpClient("vendor", base_url, timeout=5, describe=lambda body: ((), ""))


def test_the_vendor_host_goes_through_the_configured_proxy(proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = _client("http://vendor.invalid/v1")  # resolvable only by the proxy
    assert client.send("GET", "/models").json() == {"via": "proxy"}
    assert client.send("GET", "/models").json() == {"via": "proxy"}  # read once, kept
    # Another host (a signed download URL) is looked up for its own call.
    assert client.download("http://cdn.invalid/out.mp4").json() == {"via": "proxy"}
    assert proxy.seen == ["http://vendor.invalid/v1/models"] * 2 + ["http://cdn.invalid/out.mp4"]


def test_no_proxy_keeps_the_vendor_host_direct_and_not_another(proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
    monkeypatch.setenv("NO_PROXY", "vendor.invalid")
    monkeypatch.delenv("no_proxy", raising=False)
    client = _client("http://vendor.invalid/v1")
    with pytest.raises(TransientError, match=r"ConnectionError calling vendor\.invalid"):
        client.send("GET", "/models")  # straight to a name no one resolves
    assert client.download("http://cdn.invalid/out.mp4").json() == {"via": "proxy"}
    assert proxy.seen == ["http://cdn.invalid/out.mp4"]
