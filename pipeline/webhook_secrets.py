"""Each company's webhook signing secret (`whsec_...`): made on first need, rotated with grace.

Stored as Fernet ciphertext under PROVIDER_KEY_SECRETS, like provider keys (the same
cipher: pipeline.provider_keys.cipher). A rotation keeps the previous secret signing too
until `grace` has passed, so a receiver can switch to the new one at its own pace: every
webhook sent meanwhile carries two signatures (Standard Webhooks allows several,
space-separated, in `webhook-signature`). Rotating again within the grace period drops
the oldest secret at once: only the current and the one before it are ever kept.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import select, update

from pipeline.db import aware_utc, insert_ignore, iso_utc, utcnow
from pipeline.errors import PipelineError
from pipeline.tables import webhook_secrets

PREFIX = "whsec_"
SECRET_BYTES = 32


class WebhookSecretUnreadable(PipelineError):
    """No configured Fernet key decrypts the stored secret (its key was rotated away)."""

    status = 500
    code = "WEBHOOK_SECRET_UNREADABLE"


@dataclass(frozen=True)
class SigningSecrets:
    current: str
    previous: str | None  # still signing until previous_expires_at
    created_at: datetime
    rotated_at: datetime | None
    previous_expires_at: datetime | None

    @property
    def signing(self) -> list[str]:
        return [self.current] + ([self.previous] if self.previous else [])

    def view(self) -> dict:
        """What the company's admin is shown: the current secret, and when the previous
        one stops signing (the previous one itself is never shown again)."""
        return {"secret": self.current, "createdAt": iso_utc(self.created_at),
                "rotatedAt": iso_utc(self.rotated_at),
                "previousExpiresAt": iso_utc(self.previous_expires_at)}


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def current(conn, cipher: MultiFernet, company_id) -> SigningSecrets:
    """The company's secrets, made now if it has none. Call inside a transaction."""
    _ensure(conn, cipher, company_id)
    row = conn.execute(select(webhook_secrets)
                       .where(webhook_secrets.c.company_id == company_id)).one()
    return _open(cipher, row, utcnow())


def rotate(conn, cipher: MultiFernet, company_id, *, grace: timedelta) -> SigningSecrets:
    """A new current secret; the one it replaces keeps signing for `grace` (unless no
    configured key can read it any more: then it is dropped, which is the way out)."""
    now = utcnow()
    _ensure(conn, cipher, company_id)  # a company rotating before any webhook has one
    row = conn.execute(select(webhook_secrets)
                       .where(webhook_secrets.c.company_id == company_id)
                       .with_for_update()).one()
    try:
        _unseal(cipher, row.secret_data)
        previous = row.secret_data
    except InvalidToken:
        previous = None
    conn.execute(
        update(webhook_secrets).where(webhook_secrets.c.company_id == company_id)
        .values(secret_data=_seal(cipher, new_secret()), previous_data=previous,
                previous_expires_at=now + grace if previous else None, rotated_at=now))
    row = conn.execute(select(webhook_secrets)
                       .where(webhook_secrets.c.company_id == company_id)).one()
    return _open(cipher, row, now)


def _ensure(conn, cipher: MultiFernet, company_id) -> None:
    """Two callers at once agree: the first insert wins, the other reads its secret."""
    insert_ignore(conn, webhook_secrets,
                  {"company_id": company_id, "secret_data": _seal(cipher, new_secret()),
                   "created_at": utcnow()}, ["company_id"])


def _open(cipher: MultiFernet, row, now: datetime) -> SigningSecrets:
    expires = aware_utc(row.previous_expires_at)
    in_grace = row.previous_data is not None and expires is not None and expires > now
    try:
        previous = _unseal(cipher, row.previous_data) if in_grace else None
        return SigningSecrets(_unseal(cipher, row.secret_data), previous,
                              aware_utc(row.created_at), aware_utc(row.rotated_at),
                              expires if in_grace else None)
    except InvalidToken:
        raise WebhookSecretUnreadable(
            "The company's webhook secret cannot be decrypted with the configured "
            "PROVIDER_KEY_SECRETS (the key that encrypted it was removed). Restore that "
            "key, or rotate the webhook secret.",
            details={"companyId": str(row.company_id)}) from None


def _seal(cipher: MultiFernet, secret: str) -> str:
    return cipher.encrypt(secret.encode()).decode()


def _unseal(cipher: MultiFernet, data: str) -> str:
    return cipher.decrypt(data.encode()).decode()


def reencrypt(engine, cipher: MultiFernet) -> int:
    """Re-encrypt every stored secret with the first Fernet key (after an operator
    prepends a new one to PROVIDER_KEY_SECRETS); the number of rows rewritten."""
    count = 0
    with engine.begin() as conn:
        for row in conn.execute(select(webhook_secrets).with_for_update()).all():
            previous = row.previous_data and cipher.rotate(row.previous_data.encode()).decode()
            conn.execute(update(webhook_secrets)
                         .where(webhook_secrets.c.company_id == row.company_id)
                         .values(secret_data=cipher.rotate(row.secret_data.encode()).decode(),
                                 previous_data=previous))
            count += 1
    return count
