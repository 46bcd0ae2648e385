"""Starts and stops a whole stack on one machine: API in-process, a worker with beat beside it.

Used by `pipeline run` and `pipeline demo`. Production runs these pieces separately
(compose.yaml): gunicorn for the API, one worker per queue family, one beat.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tasks.names import ALL_QUEUES


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def worker_command(queues=ALL_QUEUES, *, pool: str = "threads", concurrency: int = 4,
                   beat: bool = False, loglevel: str = "INFO", hostname: str | None = None):
    cmd = [sys.executable, "-m", "celery", "-A", "tasks.worker", "worker",
           "-Q", ",".join(queues), "-P", pool, "-c", str(concurrency), "-l", loglevel,
           "--without-mingle", "--without-gossip"]
    if hostname:
        cmd += ["-n", hostname]
    if beat:
        cmd.append("-B")
    return cmd


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP unwind like Ctrl-C (KeyboardInterrupt) while the stack runs.

    The worker runs in a session of its own (so a terminal's Ctrl-C reaches only us, and
    we stop it in order); a signal that simply ended this process would leave it, and
    beat inside it, running. Unwinding instead runs the `finally` that stops them.
    Call from the main thread.
    """
    signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stack:
    """One worker subprocess (all queues, with beat) and the API on a background thread."""

    def __init__(self, settings, host: str, port: int, *, log_path=None,
                 concurrency: int = 4):
        self.settings = settings
        self.host = host
        self.port = port
        self.log_path = log_path
        self.concurrency = concurrency
        self.worker: subprocess.Popen | None = None
        self.server = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def child_env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("PIPELINE_DATA_DIR", str(self.settings.data_dir))
        env["PUBLIC_URL"] = self.url
        env["PYTHONUNBUFFERED"] = "1"  # the worker log is a file; show lines as they happen
        return env

    def start(self, runtime) -> None:
        from werkzeug.serving import make_server

        from api import create_app

        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.worker = subprocess.Popen(
            worker_command(beat=True, concurrency=self.concurrency),
            env=self.child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )
        self.server = make_server(self.host, self.port, create_app(runtime), threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """Stops the API and the worker with beat; a second Ctrl-C or SIGTERM while the
        worker finishes its tasks kills it at once."""
        worker = self.worker
        try:
            if worker is not None and worker.poll() is None:
                # Warm shutdown: the worker finishes what runs, beat stops with it.
                self._signal_worker(signal.SIGTERM)
            if self.server is not None:
                self.server.shutdown()
                self.server = None
            deadline = time.monotonic() + timeout
            while worker is not None and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass  # asked twice: stop waiting
        finally:
            if worker is not None and worker.poll() is None:
                self._signal_worker(signal.SIGKILL)
                worker.wait()
            if self._log:
                self._log.close()
                self._log = None

    def _signal_worker(self, sig: int) -> None:
        # The whole process group: the worker, its pool and beat's process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, sig)
