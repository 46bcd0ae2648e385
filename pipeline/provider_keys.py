"""Per-company SaaS provider keys, encrypted at rest with rotatable Fernet keys.

The secret is stored only as Fernet ciphertext (`key_data`) made with the first of
`Settings.provider_key_secrets`; every key in that tuple can decrypt, so an operator
rotates by prepending a new key, running `rotate`, then dropping the old one.

Nothing here returns the secret except `lookup`, which workers call just before a
provider call. Everything shown to people is the public view: provider, fingerprint
and timestamps.

Fingerprint: `sha256:<first 12 hex digits of SHA-256(secret)>`, followed by ` …<last 4>`
when the secret is at least 20 characters long (the form vendor dashboards use, e.g.
"sk-…abcd", so a person can tell which of their keys is stored). The digest prefix
is one-way and lets the owner check a key they hold (`printf %s "$KEY" | sha256sum`)
without the server ever showing it; the last four characters of a long random key
leave at least 16 unknown, and short secrets get no tail at all.
"""

from __future__ import annotations

import functools
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.config import SAAS_PROVIDERS
from pipeline.db import autocommit, iso_utc, new_id, utcnow
from pipeline.errors import PipelineError, ValidationFailed
from pipeline.tables import provider_keys

MAX_SECRET_LENGTH = 4096
# Below this length the last four characters are too large a share of the secret to show.
LAST4_MIN_LENGTH = 20
# Providers that run on our own machines and so never take a company key.
_KEYLESS = {"comfyui": "ComfyUI runs on the deployment's own GPU workers",
            "local": "The local provider runs inside the pipeline"}


class ProviderKeyUnreadable(PipelineError):
    """A stored key no configured Fernet key can decrypt (its key was rotated away)."""

    status = 500
    code = "PROVIDER_KEY_UNREADABLE"

    def __init__(self, company_id, provider: str):
        # Deliberately no ciphertext and no Fernet detail: only where the row is.
        super().__init__(
            f"The stored {provider} key cannot be decrypted with the configured "
            "PROVIDER_KEY_SECRETS (the key that encrypted it was removed). Restore that "
            "secret, or set the provider key again.",
            details={"companyId": str(company_id), "provider": provider},
        )


def cipher(secrets: tuple[str, ...]) -> MultiFernet:
    """The cipher for `settings.provider_key_secrets`: the first encrypts, all decrypt.
    Made once per set of secrets (a process's settings do not change while it runs)."""
    return _cipher(tuple(secrets))


@functools.lru_cache(maxsize=8)
def _cipher(secrets: tuple[str, ...]) -> MultiFernet:
    if not secrets:
        raise ValueError("PROVIDER_KEY_SECRETS is empty: provider keys cannot be encrypted")
    return MultiFernet([Fernet(key) for key in secrets])


def fingerprint(secret: str) -> str:
    digest = hashlib.sha256(secret.encode()).hexdigest()[:12]
    tail = f" …{secret[-4:]}" if len(secret) >= LAST4_MIN_LENGTH else ""
    return f"sha256:{digest}{tail}"


def validate_provider(provider: str) -> None:
    if provider in _KEYLESS:
        raise ValidationFailed(
            f"{_KEYLESS[provider]} and needs no API key.",
            details={"field": "provider", "allowed": list(SAAS_PROVIDERS)},
        )
    if provider not in SAAS_PROVIDERS:
        raise ValidationFailed(
            f"Unknown provider '{provider}'.",
            details={"field": "provider", "allowed": list(SAAS_PROVIDERS)},
        )


def clean_secret(secret) -> str:
    """The secret without surrounding whitespace (a pasted newline); refused if malformed.

    Messages never quote the value: it may be a real key pasted in the wrong place.
    """
    if not isinstance(secret, str):
        raise ValidationFailed("The API key must be a string.", details={"field": "apiKey"})
    secret = secret.strip()
    if not secret:
        raise ValidationFailed("The API key must not be empty.", details={"field": "apiKey"})
    if len(secret) > MAX_SECRET_LENGTH:
        raise ValidationFailed(
            f"The API key is longer than {MAX_SECRET_LENGTH} characters.",
            details={"field": "apiKey", "maxLength": MAX_SECRET_LENGTH},
        )
    # Keys travel in HTTP headers: printable ASCII, no spaces, nothing a header would mangle.
    if not all(33 <= ord(ch) <= 126 for ch in secret):
        raise ValidationFailed(
            "The API key may contain only printable ASCII characters, without whitespace.",
            details={"field": "apiKey"},
        )
    return secret


def set_key(engine, cipher: MultiFernet, company_id, provider: str, secret) -> dict:
    """Store (or replace) the company's key for a provider; returns its public view."""
    validate_provider(provider)
    secret = clean_secret(secret)
    now = utcnow()
    values = {"key_data": cipher.encrypt(secret.encode()).decode(),
              "fingerprint": fingerprint(secret), "updated_at": now}
    with engine.begin() as conn:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(provider_keys).values(
            id=new_id(), company_id=company_id, provider=provider, created_at=now, **values)
        row = conn.execute(
            stmt.on_conflict_do_update(index_elements=["company_id", "provider"], set_=values)
            .returning(provider_keys.c.provider, provider_keys.c.fingerprint,
                       provider_keys.c.created_at, provider_keys.c.updated_at)
        ).one()
    return _public(row)


def list_keys(engine, company_id) -> list[dict]:
    """The company's stored keys as public views, by provider name."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(provider_keys.c.provider, provider_keys.c.fingerprint,
                   provider_keys.c.created_at, provider_keys.c.updated_at)
            .where(provider_keys.c.company_id == company_id)
            .order_by(provider_keys.c.provider)
        ).all()
    return [_public(row) for row in rows]


def delete_key(engine, company_id, provider: str) -> bool:
    """Remove the company's key for a provider; False when there was none."""
    with engine.begin() as conn:
        gone = conn.execute(
            delete(provider_keys)
            .where(provider_keys.c.company_id == company_id,
                   provider_keys.c.provider == provider)
            .returning(provider_keys.c.id)
        ).first()
    return gone is not None


# lookup's read, built once: it runs before every call to a keyed provider.
_KEY_DATA = select(provider_keys.c.key_data).where(
    provider_keys.c.company_id == bindparam("company"),
    provider_keys.c.provider == bindparam("name"))


def lookup(engine, cipher: MultiFernet, company_id, provider: str) -> str | None:
    """The decrypted secret for a worker about to call the provider; None when not set."""
    with autocommit(engine) as conn:  # one read: no BEGIN and ROLLBACK around it
        token = conn.execute(_KEY_DATA, {"company": company_id, "name": provider}
                             ).scalar_one_or_none()
    return unseal(cipher, token, company_id, provider)


def unseal(cipher: MultiFernet, token: str | None, company_id, provider: str) -> str | None:
    """A stored key_data decrypted (read by lookup, or by the generate step's claim)."""
    if token is None:
        return None
    try:
        return cipher.decrypt(token.encode()).decode()
    except InvalidToken:
        raise ProviderKeyUnreadable(company_id, provider) from None


def rotate(engine, cipher: MultiFernet) -> int:
    """Re-encrypt every stored key with the newest secret; returns how many rows.

    One transaction with the rows locked, so a key replaced meanwhile is not overwritten
    with its old value, and a row no secret can read leaves every row as it was.
    """
    with engine.begin() as conn:
        rows = conn.execute(
            select(provider_keys.c.id, provider_keys.c.company_id, provider_keys.c.provider,
                   provider_keys.c.key_data)
            .with_for_update()
        ).all()
        for row in rows:
            try:
                token = cipher.rotate(row.key_data.encode()).decode()
            except InvalidToken:
                raise ProviderKeyUnreadable(row.company_id, row.provider) from None
            # updated_at is left alone: the key itself did not change.
            conn.execute(update(provider_keys).where(provider_keys.c.id == row.id)
                         .values(key_data=token))
    return len(rows)


def _public(row) -> dict:
    return {"provider": row.provider, "fingerprint": row.fingerprint,
            "createdAt": iso_utc(row.created_at), "updatedAt": iso_utc(row.updated_at)}
