"""The gate every request passes before its view: who is calling, then what they sent.

In this order, so a caller without a key learns nothing from a validation message:

1. Authentication (401) for every endpoint outside the public blueprints, then the
   admin scope (403) for views marked `admin_only`. The rate limits of the key and its
   company (429, api/limits.py) are checked just before this gate, by the limiter's
   own hook, once the key is known.
2. The body of a POST, PUT or PATCH: at most MAX_BODY_BYTES (413, chunked bodies too),
   JSON (415 otherwise), valid UTF-8 and JSON, nested at most MAX_DEPTH deep, whole
   numbers within 64 bits, no NaN or infinities, and text that PostgreSQL and SQLite
   both store the same way: no NUL character and no unpaired UTF-16 surrogate.
3. Query parameters: no NUL character.

Every refusal is a 4xx in the envelope naming the field (`details.field`, a path such
as `settings.steps[2].text`). Field-specific ranges (an amount's maximum, say) are the
schemas' and use cases' business; this gate makes sure none of them meets a value the
database or the JSON encoder would choke on.
"""

from __future__ import annotations

import json
import math
import re

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge, UnsupportedMediaType

from api.auth import current_principal, require_admin
from pipeline.errors import ValidationFailed

MAX_BODY_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_INTEGER = 2**63 - 1
# Seen without a key: liveness, signed download links (the signature is the credential),
# the OpenAPI document and its viewer (with its assets), the metrics endpoint, and the
# web console's static page (its key is typed into the page and sent to /v1 only).
PUBLIC_BLUEPRINTS = frozenset({"health", "files", "api-docs", "docs-assets", "metrics",
                               "console"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def admin_only(view):
    """Marks a view method as needing an admin-scoped key, checked before its body."""
    view.admin_only = True
    return view


class _OutOfRange(str):
    """A number literal the parser met and the database could not hold, kept as written."""


def _whole(literal: str):
    digits = literal.lstrip("-")
    if len(digits) > 19 or abs(int(literal)) > MAX_INTEGER:
        return _OutOfRange(literal)
    return int(literal)


def _fraction(literal: str):
    value = float(literal)
    return value if math.isfinite(value) else _OutOfRange(literal)


def install(app) -> None:
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.before_request
    def _gate():
        if request.endpoint is None:
            return  # no such route: 404 or 405 follows, with no key needed to learn it
        if request.blueprint not in PUBLIC_BLUEPRINTS:
            current_principal()
            if _needs_admin():
                require_admin()
        for name, value in request.args.items(multi=True):
            if _UNSTORABLE.search(name) or _UNSTORABLE.search(value):
                raise ValidationFailed(f"The query parameter '{name[:40]}' contains a NUL "
                                       "character.", details={"field": name[:40]})
        if request.method in _BODY_METHODS:
            check_body()


def _needs_admin() -> bool:
    view = current_app.view_functions[request.endpoint]
    view_class = getattr(view, "view_class", None)
    if view_class is not None:
        view = getattr(view_class, request.method.lower(), None)
    return bool(getattr(view, "admin_only", False))


def check_body() -> None:
    """Refuse a body no view should see; its parsing is left to the view's schema."""
    data = request.get_data(cache=True)  # 413 when Content-Length is past the limit
    if len(data) >= MAX_BODY_BYTES:
        # A chunked body is cut at the limit rather than refused: refuse it here.
        raise RequestEntityTooLarge(f"The request body must be under {MAX_BODY_BYTES} bytes.")
    if not data:
        return
    if not request.is_json:
        raise UnsupportedMediaType("Send the body as JSON, with Content-Type: application/json.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed("The request body is not valid UTF-8.",
                               details={"position": exc.start}) from None
    try:
        value = json.loads(text, parse_int=_whole, parse_float=_fraction,
                           parse_constant=_OutOfRange)
    except RecursionError:
        raise _too_deep("") from None
    except json.JSONDecodeError as exc:
        raise _not_json(exc) from None
    check_value(value)


def _not_json(exc: json.JSONDecodeError) -> ValidationFailed:
    """Say exactly why a body is not JSON; comments and trailing commas by name, since
    examples copied from documentation (seed 000's request body, say) often carry them."""
    text, pos = exc.doc, exc.pos
    # The parser stops at the first character it cannot take, never inside a string:
    # a `//` or `/*` there is a comment.
    if text.startswith(("//", "/*"), pos):
        shown = "// ..." if text.startswith("//", pos) else "/* ... */"
        return _syntax(f"JSON does not allow comments: remove the `{shown}`", text, pos,
                       "comments are not JSON")
    before = len(text[:pos].rstrip())
    if text[pos:pos + 1] in ("]", "}") and text[before - 1:before] == ",":
        return _syntax("JSON does not allow a trailing comma: remove the `,`", text,
                       before - 1, "trailing commas are not JSON")
    return ValidationFailed("The request body is not valid JSON.",
                            details={"line": exc.lineno, "column": exc.colno,
                                     "reason": exc.msg})


def _syntax(what: str, text: str, pos: int, reason: str) -> ValidationFailed:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)  # 1-based, as JSONDecodeError counts
    return ValidationFailed(f"The request body is not valid JSON. {what} at line {line}, "
                            f"column {column}.",
                            details={"line": line, "column": column, "reason": reason})


def _too_deep(field: str) -> ValidationFailed:
    return ValidationFailed(f"The request body is nested more than {MAX_DEPTH} levels deep.",
                            details={"field": field, "maxDepth": MAX_DEPTH})


def check_value(value) -> None:
    """Walk a parsed body (without recursion) and refuse what cannot be stored as sent."""
    pending = [(value, "", 0)]
    while pending:
        item, path, depth = pending.pop()
        if isinstance(item, _OutOfRange):
            raise ValidationFailed(
                f"{path or 'The body'}: the number {item[:40]} is out of range (whole numbers "
                f"up to {MAX_INTEGER}, finite decimals only).",
                details={"field": path, "max": MAX_INTEGER})
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise _too_deep(path)
            if isinstance(item, dict):
                for key, child in item.items():
                    child_path = f"{path}.{key}" if path else key
                    _check_text(key, child_path)
                    pending.append((child, child_path, depth + 1))
            else:
                pending.extend((child, f"{path}[{i}]", depth + 1)
                               for i, child in enumerate(item))


def _check_text(text: str, field: str) -> None:
    found = _UNSTORABLE.search(text)
    if found is None:
        return
    what = "a NUL character" if found.group() == "\x00" else "an unpaired UTF-16 surrogate"
    shown = _UNSTORABLE.sub("?", field)[:200]
    raise ValidationFailed(
        f"{shown or 'The body'} contains {what}, which cannot be stored.",
        details={"field": shown, "position": found.start()})
