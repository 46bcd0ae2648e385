"""Idempotency keys: claim a key for one request, store its response, replay it on retries.

Stripe's semantics, scoped to the company: the first request with a key claims it
(an `in_flight` row); its response is stored (`done`) and returned again to every
retry with the same body until the key expires. A retry while the first request
still runs is refused (409), as is the key reused with another body (422). A request
that failed with an error that created nothing gives its key back (`abandon`), so
the client may retry with the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, tuple_, update

from pipeline.db import insert_ignore, utcnow
from pipeline.errors import Conflict, PipelineError, ValidationFailed
from pipeline.tables import idempotency_keys

log = logging.getLogger("pipeline.idempotency")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
DEFAULT_TTL_SECONDS = 24 * 3600
# A claim can vanish between our INSERT and SELECT (abandoned or purged): claim again.
_CLAIM_ATTEMPTS = 3


class IdempotencyInFlight(Conflict):
    code = "IDEMPOTENCY_IN_FLIGHT"

    def __init__(self):
        super().__init__("A request with this key is still being processed; retry later.",
                         details={"header": HEADER})


class IdempotencyKeyReused(PipelineError):
    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self):
        super().__init__("This key was used with a different request body.",
                         details={"header": HEADER})


@dataclass(frozen=True)
class Replay:
    """The stored response of the first request made with a key."""

    status: int
    body: dict


def request_hash(payload: dict) -> str:
    """sha256 of the payload as canonical JSON: key order and whitespace do not count."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> None:
    """1 to 255 printable ASCII characters (space included), else ValidationFailed."""
    if not (0 < len(key) <= MAX_KEY_LENGTH and all(" " <= ch <= "~" for ch in key)):
        raise ValidationFailed(
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
            details={"header": HEADER, "maxLength": MAX_KEY_LENGTH},
        )


def _this(company_id, key):
    return (idempotency_keys.c.company_id == company_id) & (idempotency_keys.c.key == key)


def begin(engine, company_id, key: str, request_hash: str,
          ttl_seconds: int = DEFAULT_TTL_SECONDS) -> Replay | None:
    """Claim the key for this request (None: go ahead), or return the stored response.

    Raises IdempotencyInFlight while the first request with the key still runs, and
    IdempotencyKeyReused when the key came with another request body. An expired key
    is free again: it is deleted and claimed in the same transaction.
    """
    check_key(key)
    for _ in range(_CLAIM_ATTEMPTS):
        now = utcnow()
        with engine.begin() as conn:
            # A concurrent claim of the same expired key blocks on this row lock and
            # then deletes nothing; its INSERT then waits for ours and does nothing.
            conn.execute(delete(idempotency_keys)
                         .where(_this(company_id, key), idempotency_keys.c.expires_at <= now))
            claimed = insert_ignore(
                conn,
                idempotency_keys,
                {"company_id": company_id, "key": key, "request_hash": request_hash,
                 "status": "in_flight", "created_at": now,
                 "expires_at": now + timedelta(seconds=ttl_seconds)},
                ["company_id", "key"],
            )
            if claimed:
                return None
            row = conn.execute(select(idempotency_keys).where(_this(company_id, key))).first()
        if row is None:
            continue
        if row.request_hash != request_hash:
            raise IdempotencyKeyReused()
        if row.status != "done":
            raise IdempotencyInFlight()
        return Replay(status=row.response_status, body=row.response_body)
    # Only reached if the key was claimed and released three times within this call.
    raise IdempotencyInFlight()


def finish(engine, company_id, key: str, status: int, body: dict) -> None:
    """Store the response of the request that claimed the key; retries now replay it."""
    with engine.begin() as conn:
        stored = conn.execute(
            update(idempotency_keys)
            .where(_this(company_id, key), idempotency_keys.c.status == "in_flight")
            .values(status="done", response_status=status, response_body=body)
        ).rowcount
    if not stored:
        # Purged or taken over after expiry while the request ran: nothing to replay.
        log.warning("idempotency key of company %s was gone before its response was stored",
                    company_id)


def abandon(engine, company_id, key: str) -> None:
    """Give the key back after a failure that created nothing, so a retry runs again."""
    with engine.begin() as conn:
        conn.execute(delete(idempotency_keys)
                     .where(_this(company_id, key), idempotency_keys.c.status == "in_flight"))


def purge_expired(engine, batch: int = 1000) -> int:
    """Delete up to `batch` expired keys; the number deleted. For the sweeper."""
    with engine.begin() as conn:
        expired = (
            select(idempotency_keys.c.company_id, idempotency_keys.c.key)
            .where(idempotency_keys.c.expires_at <= utcnow())
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        return conn.execute(
            delete(idempotency_keys)
            .where(tuple_(idempotency_keys.c.company_id, idempotency_keys.c.key).in_(expired))
        ).rowcount
