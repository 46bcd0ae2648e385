"""/healthz: is the API up and can it reach its database."""

from __future__ import annotations

from flask import Blueprint, current_app
from sqlalchemy import text

blp = Blueprint("health", __name__)


@blp.get("/healthz")
def healthz():
    engine = current_app.extensions["runtime"].engine
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok"}
