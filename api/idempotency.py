"""The `Idempotency-Key` header on POST endpoints: replay a stored response, or run and store.

What is stored (Stripe's rule, but a 5xx gives the key back instead of being stored):
2xx responses and 4xx errors raised by the view are stored and replayed with
`Idempotent-Replayed: true`; a 5xx or an unexpected exception abandons the key, so
the client can retry with the same one. Requests refused before the view runs
(401, body validation) never claim the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import current_app, jsonify, request

from api.auth import current_principal
from pipeline import idempotency
from pipeline.errors import PipelineError

REPLAYED_HEADER = "Idempotent-Replayed"

IDEMPOTENCY_KEY_DOC = {
    "in": "header",
    "name": idempotency.HEADER,
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH},
    "description": (
        "A unique key (a v4 UUID, say) that makes retrying this request safe for 24 hours: "
        "a retry with the same key and body gets the first response again, with the header "
        "`Idempotent-Replayed: true`, instead of creating a second job. 409 "
        "IDEMPOTENCY_IN_FLIGHT: the first request is still running; 422 "
        "IDEMPOTENCY_KEY_REUSED: the key came with another body. Server errors (5xx) are "
        "not stored: retry them with the same key."
    ),
}

# (body, status, headers), as a Flask view returns it.
ViewResult = tuple[dict, int, dict]


def idempotent(endpoint: str, payload: dict, run: Callable[[], ViewResult], *,
               replay_headers: Callable[[idempotency.Replay], dict] | None = None):
    """Run the view once per key: `run()` on the first request, the stored response after.

    `payload` is the parsed request body (so key order and whitespace do not count);
    `endpoint` keeps a key from replaying another endpoint's response.
    """
    key = request.headers.get(idempotency.HEADER)
    if key is None:
        return run()
    engine = current_app.extensions["runtime"].engine
    company_id = current_principal().company_id
    request_hash = idempotency.request_hash({"endpoint": endpoint, "body": payload})
    replay = idempotency.begin(engine, company_id, key, request_hash)
    if replay is not None:
        response = jsonify(replay.body)
        response.status_code = replay.status
        response.headers.update(replay_headers(replay) if replay_headers else {})
        response.headers[REPLAYED_HEADER] = "true"
        return response
    try:
        body, status, headers = run()
    except PipelineError as exc:
        if exc.status >= 500:
            idempotency.abandon(engine, company_id, key)
        else:
            idempotency.finish(engine, company_id, key, exc.status, _as_json(
                {"error": exc.message, "code": exc.code, "details": exc.details}))
        raise
    except Exception:
        idempotency.abandon(engine, company_id, key)
        raise
    idempotency.finish(engine, company_id, key, status, _as_json(body))
    return body, status, headers


def _as_json(body: dict) -> dict:
    # Through Flask's encoder, as the response itself is: the replay carries the same
    # values, and Decimals or UUIDs in error details do not break the JSONB column.
    return json.loads(current_app.json.dumps(body))
