"""Resolves `Authorization: Bearer <key>` to the calling company for each request."""

from __future__ import annotations

from flask import current_app, g, request

from pipeline.accounts import authenticate
from pipeline.errors import Forbidden
from pipeline.jobs import Principal


def current_principal() -> Principal:
    if "principal" not in g:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        secret = token.strip() if scheme.lower() == "bearer" else None
        if secret is None and header:
            secret = ""  # present but not Bearer: reported as invalid, not as missing
        g.principal = authenticate(current_app.extensions["runtime"].engine, secret)
    return g.principal


def require_admin() -> Principal:
    principal = current_principal()
    if principal.scope != "admin":
        raise Forbidden("This endpoint needs an admin-scoped API key.")
    return principal
