"""A TCP relay that can go silent, for servers that stop answering mid-conversation."""

from __future__ import annotations

import select
import socket
import socketserver
import threading

from tests.fakes.base import ThreadedServer


class TcpProxy(ThreadedServer):
    """Relays TCP to a server (a broker, Redis), or, held, accepts connections and never
    answers, as a stopped (SIGSTOP) server does, or a black hole on the path.

    Bytes caught by a hold are relayed once forwarding resumes, as a stopped broker
    reads them when it is continued.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._forwarding = threading.Event()  # clear: held
        self._closing = threading.Event()
        self._httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Relay)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.proxy = self  # type: ignore[attr-defined]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def hold(self) -> None:
        self._forwarding.clear()

    def forward(self) -> None:
        self._forwarding.set()

    def wait_forwarding(self) -> bool:
        """Block while held; False once the proxy is stopping."""
        while not self._forwarding.wait(0.1):
            if self._closing.is_set():
                return False
        return not self._closing.is_set()

    @property
    def stopping(self) -> bool:
        return self._closing.is_set()

    def stop(self) -> None:
        self._closing.set()
        super().stop()


class _Relay(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        proxy: TcpProxy = self.server.proxy  # type: ignore[attr-defined]
        if not proxy.wait_forwarding():
            return
        with socket.create_connection(proxy.upstream, timeout=10) as upstream:
            peers = {self.request: upstream, upstream: self.request}
            while not proxy.stopping:
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data or not proxy.wait_forwarding():
                        return
                    peers[sock].sendall(data)
