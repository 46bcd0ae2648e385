"""One log line per request: method, path, status, time, and who called once known.

The query string is never logged (file links carry their signature there), nor any
header but a caller's X-Request-Id, which is echoed back so a client can quote it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import g, request

from pipeline import logcontext

# Not under "pipeline": a line per request goes to stdout, and only the 5xx ones (at
# WARNING) to the logs table; polling clients would otherwise fill it.
log = logging.getLogger("api.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def install(app) -> None:
    """Register after the gate: the scope opens before it (a refused request is logged
    too), the caller is bound right after it, so the handler's own lines carry it."""

    def _open_scope():
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        g.log_scope = logcontext.scope(request_id=g.request_id)
        g.log_scope.__enter__()
        g.started = time.perf_counter()

    app.before_request_funcs.setdefault(None, []).insert(0, _open_scope)

    @app.before_request
    def _bind_caller():
        principal = g.get("principal")
        if principal is not None:
            logcontext.bind(company_id=principal.company_id, user_id=principal.user_id)

    @app.after_request
    def _log_request(response):
        _bind_caller()  # a handler that authenticated itself (the gate skips public ones)
        took = round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1)
        level = logging.WARNING if response.status_code >= 500 else logging.INFO
        log.log(level, "%s %s %s %.1f ms", request.method, request.path,
                response.status_code, took,
                extra={"method": request.method, "path": request.path,
                       "status": response.status_code, "duration_ms": took})
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        return response

    @app.teardown_request
    def _close_scope(_exc=None):
        scope = g.pop("log_scope", None)
        if scope is not None:
            scope.__exit__(None, None, None)
