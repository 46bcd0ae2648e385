"""/v1/files: serves locally stored results behind signed, expiring links."""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from flask import current_app, request, send_file
from flask_smorest import Blueprint

from api.docs import errors
from pipeline.errors import Forbidden, NotFound
from pipeline.security import verify_signature
from pipeline.storage import LocalStorage, StorageError

blp = Blueprint("files", __name__, url_prefix="/v1/files",
                description="Stored results behind signed, expiring links (local storage).")

_SIGNED_LINK = [
    {"in": "query", "name": "expires", "required": True, "schema": {"type": "integer"},
     "description": "When the link stops working, in seconds since the epoch"},
    {"in": "query", "name": "signature", "required": True, "schema": {"type": "string"},
     "description": "The link's HMAC, as written in the job's `result.url`"},
]


@blp.get("/<path:key>")
@blp.doc(parameters=_SIGNED_LINK, responses={"200": {
    "description": "The file, with the content type its name implies",
    "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}})
@errors("LINK_EXPIRED", "FILE_NOT_FOUND")
def download(key: str):
    """A stored result, through the signed link in a job's `result.url`.

    The signature is the credential: no API key is needed. A link past its `expires` or
    altered in any way is 403 `LINK_EXPIRED`; fetch the job again for a fresh one. With
    an object store (S3), results are served by the store's own links and this is 404.
    """
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
