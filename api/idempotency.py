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

from flask import current_app, g, jsonify, request

from api.auth import current_principal
from pipeline import idempotency
from pipeline.errors import PipelineError

REPLAYED_HEADER = "Idempotent-Replayed"

IDEMPOTENCY_KEY_DOC = {
    "in": "header",
    "name": idempotency.HEADER,
    "required": False,
    # Printable ASCII; spaces only inside, as HTTP drops them at either end.
    "schema": {"type": "string", "minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH,
               "pattern": "^[!-~]([ -~]*[!-~])?$"},
    "description": (
        "A unique key (a v4 UUID, say) that makes retrying this request safe for 24 hours: "
        "a retry with the same key and body gets the first response again, with the header "
        "`Idempotent-Replayed: true`, instead of creating a second job. 409 "
        "IDEMPOTENCY_IN_FLIGHT: the first request is still running (retry after the "
        "`Retry-After` seconds: a request whose server died lets go of the key within "
        "IDEMPOTENCY_LEASE_SECONDS, 10 by default); 422 IDEMPOTENCY_KEY_REUSED: the key "
        "came with another body. Server errors (5xx) are not stored: retry them with the "
        "same key."
    ),
}

# (body, status, headers), as a Flask view returns it.
ViewResult = tuple[dict, int, dict]
# How a submission's response is made from its job: respond(job, queued).
Respond = Callable[[dict, bool], ViewResult]


def idempotent(endpoint: str, payload: dict, run: Callable[[], ViewResult], *,
               replay_headers: Callable[[idempotency.Replay], dict] | None = None):
    """Run the view once per key: `run()` on the first request, the stored response after.

    `payload` is the parsed request body (so key order and whitespace do not count);
    `endpoint` keeps a key from replaying another endpoint's response. A view that
    creates a job stores the response in the job's transaction (`on_job_created`);
    anything else is stored when `run()` returns or raises a 4xx.
    """
    key = request.headers.get(idempotency.HEADER)
    if key is None:
        return run()
    rt = current_app.extensions["runtime"]
    request_hash = idempotency.request_hash({"endpoint": endpoint, "body": payload})
    outcome = idempotency.begin(rt.engine, current_principal().company_id, key, request_hash,
                                lease_seconds=rt.settings.idempotency_lease_seconds)
    if isinstance(outcome, idempotency.Replay):
        response = jsonify(outcome.body)
        response.status_code = outcome.status
        response.headers.update(replay_headers(outcome) if replay_headers else {})
        response.headers[REPLAYED_HEADER] = "true"
        return response
    claim = g.idempotency_claim = outcome
    try:
        body, status, headers = run()
    except idempotency.LeaseLost:
        raise  # a retry holds the key now and answers for it
    except PipelineError as exc:
        if exc.status >= 500:
            idempotency.abandon(rt.engine, claim)
        else:
            idempotency.finish(rt.engine, claim, exc.status, _as_json(
                {"error": exc.message, "code": exc.code, "details": exc.details}))
        raise
    except Exception:
        # Gives the key back only if no job was made: a stored key is never abandoned.
        idempotency.abandon(rt.engine, claim)
        raise
    sent = _as_json(body)
    stored = g.pop("idempotency_stored", None)
    if stored is None:
        idempotency.finish(rt.engine, claim, status, sent)
    elif stored != sent:
        idempotency.revise(rt.engine, claim, sent)
    return body, status, headers


def on_job_created(respond: Respond):
    """The `on_created` hook for submit_job under a claimed key (None without one): stores
    the response the job would get unpublished, in the transaction that writes the job."""
    claim = g.get("idempotency_claim")
    if claim is None:
        return None

    def store(conn, job: dict) -> None:
        body, status, _ = respond(job, False)
        g.idempotency_stored = _as_json(body)
        idempotency.complete(conn, claim, status, g.idempotency_stored, job_id=job["id"])

    return store


def _as_json(body: dict) -> dict:
    # Through Flask's encoder, as the response itself is: the replay carries the same
    # values, and Decimals or UUIDs in error details do not break the JSONB column.
    return json.loads(current_app.json.dumps(body))
