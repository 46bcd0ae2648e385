"""API keys (stored as hashes) and signed, expiring links to stored files."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

KEY_PREFIX = "cp_"


def new_api_key() -> tuple[str, str, str]:
    """A fresh key: (secret shown once, its display prefix, the hash we store)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, secret[:10], hash_api_key(secret)


def hash_api_key(secret: str) -> str:
    # Keys are 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def sign_path(secret_key: str, path: str, expires: int) -> str:
    message = f"{path}\n{expires}".encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


def signed_query(secret_key: str, path: str, ttl_seconds: int, now: float | None = None) -> str:
    expires = int((now or time.time()) + ttl_seconds)
    return f"expires={expires}&signature={sign_path(secret_key, path, expires)}"


def verify_signature(secret_key: str, path: str, expires: str, signature: str,
                     now: float | None = None) -> bool:
    try:
        expires_at = int(expires)
    except (TypeError, ValueError):
        return False
    if expires_at < (now or time.time()):
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters (a 500, not a 403).
    return hmac.compare_digest(sign_path(secret_key, path, expires_at).encode(),
                               (signature or "").encode(errors="surrogatepass"))
