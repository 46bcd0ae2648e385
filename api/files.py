"""/v1/files: serves locally stored results behind signed, expiring links."""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from flask import Blueprint, current_app, request, send_file

from pipeline.errors import Forbidden, NotFound
from pipeline.security import verify_signature
from pipeline.storage import LocalStorage, StorageError

blp = Blueprint("files", __name__, url_prefix="/v1/files")


@blp.get("/<path:key>")
def download(key: str):
    rt = current_app.extensions["runtime"]
    if not isinstance(rt.storage, LocalStorage):
        raise NotFound("FILE_NOT_FOUND", "Files are served by the object store's own links.")
    path = f"/v1/files/{quote(key)}"
    if not verify_signature(rt.settings.secret_key, path, request.args.get("expires"),
                            request.args.get("signature")):
        raise Forbidden("This link is invalid or has expired; fetch the job again for a new one.",
                        code="LINK_EXPIRED")
    try:
        target = rt.storage.path(key)
    except StorageError:
        raise NotFound("FILE_NOT_FOUND", "No such file.") from None
    if not target.is_file():
        raise NotFound("FILE_NOT_FOUND", "No such file.")
    mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return send_file(target, mimetype=mime, max_age=0, conditional=True)
