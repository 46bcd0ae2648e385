"""/console: the web console, a static page over the /v1 API, served from this package.

The page and its script carry no secret and need no key to load: the API key is typed
into the page, kept in the browser's session storage and sent only as an
`Authorization` header to /v1. Its Content-Security-Policy lets it load and fetch from
this origin alone, so nothing it shows or runs can send a request anywhere else.
"""

from __future__ import annotations

from pathlib import Path

from flask import redirect, send_from_directory
from flask_smorest import Blueprint

from api.docs import errors
from pipeline.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = frozenset({"console.js", "console.css"})
# 'self' everywhere (default-src), never inline script or style; no framing, no <base>,
# forms posting nowhere but here.
POLICY = ("default-src 'self'; base-uri 'none'; form-action 'self'; "
          "frame-ancestors 'none'; object-src 'none'")

blp = Blueprint("console", __name__, url_prefix="/console",
                description="The web console: a page for people, over this API.")


def _file(kind: str) -> dict:
    return {"200": {"description": f"The console's {kind}",
                    "content": {kind: {"schema": {"type": "string"}}}}}


@blp.get("")
@blp.doc(responses={"308": {"description": "To /console/"}})
def page_without_slash():
    """The console, at its address with a slash."""
    return redirect("/console/", code=308)


@blp.get("/")
@blp.doc(responses=_file("text/html"))
def page():
    """The web console: sign in with an API key, submit and watch jobs, see the wallet.

    A static page; the key typed into it stays in the browser tab's session storage and
    is sent only to /v1 as an `Authorization` header.
    """
    return send_from_directory(STATIC, "index.html", max_age=0)


@blp.get("/<name>")
@blp.doc(responses=_file("text/javascript"))
@errors("FILE_NOT_FOUND")
def asset(name: str):
    """The console's script (`console.js`) and style sheet (`console.css`)."""
    if name not in ASSETS:
        raise NotFound("FILE_NOT_FOUND", "No such console file.")
    return send_from_directory(STATIC, name, max_age=0)


@blp.after_request
def protect(response):
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response
