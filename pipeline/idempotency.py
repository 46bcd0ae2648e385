"""Idempotency keys: claim a key for one request, store its response, replay it on retries.

Stripe's semantics, scoped to the company, made crash-safe:

- The first request with a key claims it: an `in_flight` row holding a lease (a random
  token and an expiry `lease_seconds` ahead, ten seconds by default).
- A request that creates a job stores its response in the same transaction as the job
  (`complete`), so a key points at its job or at nothing: never at a job it cannot name.
- A retry while the lease runs is refused (409, with the seconds left); a retry after
  the lease lapsed (the first request's process died) takes the claim over and runs. If
  the first request was only slow, its transaction finds its lease gone and rolls back
  (`LeaseLost`), so one key still makes one job.
- A retry after `done` gets the stored response until the key expires (24 hours); the
  same key with another body is refused (422). A request that failed with an error that
  created nothing gives the key back (`abandon`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, or_, select, tuple_, update

from pipeline.db import aware_utc, insert_ignore, utcnow
from pipeline.errors import Conflict, PipelineError, ValidationFailed
from pipeline.tables import idempotency_keys

log = logging.getLogger("pipeline.idempotency")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
DEFAULT_TTL_SECONDS = 24 * 3600
DEFAULT_LEASE_SECONDS = 10
# A claim can vanish between our INSERT and SELECT (abandoned or purged): claim again.
_CLAIM_ATTEMPTS = 3


class IdempotencyInFlight(Conflict):
    code = "IDEMPOTENCY_IN_FLIGHT"

    def __init__(self, retry_after: int = 1):
        super().__init__("A request with this key is still being processed; retry later.",
                         details={"header": HEADER, "retryAfterSeconds": retry_after})
        self.retry_after = retry_after


class LeaseLost(IdempotencyInFlight):
    """Raised inside the job's transaction when a retry took the claim over: roll back."""


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


@dataclass(frozen=True)
class Claim:
    """This request's hold on a key: every write checks the token, so a lapsed lease
    taken over by a retry can no longer be completed by the request that lost it."""

    company_id: object
    key: str
    token: str


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


def _held(claim: Claim):
    return _this(claim.company_id, claim.key) & (idempotency_keys.c.lease_token == claim.token)


def begin(engine, company_id, key: str, request_hash: str, *,
          ttl_seconds: int = DEFAULT_TTL_SECONDS,
          lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Claim | Replay:
    """Claim the key for this request, or return the stored response.

    Raises IdempotencyInFlight while another request holds a live lease on the key, and
    IdempotencyKeyReused when the key came with another request body. An expired key is
    free again (deleted and claimed in one transaction); a lapsed lease is taken over.
    """
    check_key(key)
    for _ in range(_CLAIM_ATTEMPTS):
        now = utcnow()
        claim = Claim(company_id, key, secrets.token_hex(16))
        lease = {"lease_token": claim.token,
                 "lease_expires_at": now + timedelta(seconds=lease_seconds)}
        with engine.begin() as conn:
            # A concurrent claim of the same expired key blocks on this row lock and
            # then deletes nothing; its INSERT then waits for ours and does nothing.
            conn.execute(delete(idempotency_keys)
                         .where(_this(company_id, key), idempotency_keys.c.expires_at <= now))
            if insert_ignore(
                conn,
                idempotency_keys,
                {"company_id": company_id, "key": key, "request_hash": request_hash,
                 "status": "in_flight", "created_at": now,
                 "expires_at": now + timedelta(seconds=ttl_seconds), **lease},
                ["company_id", "key"],
            ):
                return claim
            taken_over = conn.execute(
                update(idempotency_keys)
                .where(_this(company_id, key),
                       idempotency_keys.c.status == "in_flight",
                       idempotency_keys.c.request_hash == request_hash,
                       or_(idempotency_keys.c.lease_expires_at.is_(None),
                           idempotency_keys.c.lease_expires_at <= now))
                .values(**lease)
            ).rowcount
            if taken_over:
                log.info("idempotency key of company %s: lapsed lease taken over", company_id)
                return claim
            row = conn.execute(select(idempotency_keys).where(_this(company_id, key))).first()
        if row is None:
            continue
        if row.request_hash != request_hash:
            raise IdempotencyKeyReused()
        if row.status != "done":
            left = (aware_utc(row.lease_expires_at) - now).total_seconds()
            raise IdempotencyInFlight(retry_after=max(1, int(left + 0.999)))
        return Replay(status=row.response_status, body=row.response_body)
    # Only reached if the key was claimed and released three times within this call.
    raise IdempotencyInFlight()


def complete(conn, claim: Claim, status: int, body: dict, job_id=None) -> None:
    """Store the response in the caller's transaction (the one that writes the job).

    Raises LeaseLost when a retry took the claim over: the caller's transaction must
    roll back, so the job is made once, by the request that holds the key.
    """
    stored = conn.execute(
        update(idempotency_keys)
        .where(_held(claim), idempotency_keys.c.status == "in_flight")
        .values(status="done", response_status=status, response_body=body, job_id=job_id)
    ).rowcount
    if not stored:
        raise LeaseLost()


def finish(engine, claim: Claim, status: int, body: dict) -> None:
    """Store a response that created nothing (a 4xx): retries replay it."""
    try:
        with engine.begin() as conn:
            complete(conn, claim, status, body)
    except LeaseLost:
        # Taken over after the lease lapsed while this request ran: the retry answers.
        log.warning("idempotency key of company %s was taken over before its response "
                    "was stored", claim.company_id)


def revise(engine, claim: Claim, body: dict) -> None:
    """After the job's commit, replace its stored body with the one finally sent
    (a job published at once says `queued` where the stored one said `pending`)."""
    with engine.begin() as conn:
        conn.execute(update(idempotency_keys)
                     .where(_held(claim), idempotency_keys.c.status == "done")
                     .values(response_body=body))


def abandon(engine, claim: Claim) -> None:
    """Give the key back after a failure that created nothing, so a retry runs again."""
    with engine.begin() as conn:
        conn.execute(delete(idempotency_keys)
                     .where(_held(claim), idempotency_keys.c.status == "in_flight"))


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
