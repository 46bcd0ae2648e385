"""Companies, their wallets and API keys; resolving a presented key to a Principal."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update

from pipeline import ledger
from pipeline.db import autocommit, new_id, utcnow
from pipeline.errors import Unauthorized
from pipeline.jobs import Principal
from pipeline.security import hash_api_key, new_api_key
from pipeline.tables import api_keys, companies, users, wallets


@dataclass(frozen=True)
class NewCompany:
    company_id: object
    wallet_id: object
    user_id: object
    api_key: str  # shown once; only its hash is stored
    admin_key: str


def create_company(engine, name: str, *, credits=0, email: str | None = None) -> NewCompany:
    """A company with a wallet (optionally funded), one user, a client key and an admin key."""
    company_id, wallet_id, user_id = new_id(), new_id(), new_id()
    with engine.begin() as conn:
        conn.execute(companies.insert().values(id=company_id, name=name))
        conn.execute(users.insert().values(id=user_id, company_id=company_id, email=email,
                                           name=name))
        conn.execute(wallets.insert().values(id=wallet_id, company_id=company_id))
        if credits and float(credits) > 0:
            ledger.deposit(conn, wallet_id, credits, key=f"initial:{company_id}",
                           metadata={"reason": "initial credits"})
        client = _insert_key(conn, company_id, user_id, "default", "client")
        admin = _insert_key(conn, company_id, None, "admin", "admin")
    return NewCompany(company_id, wallet_id, user_id, client, admin)


def create_api_key(engine, company_id, *, name: str = "", scope: str = "client",
                   user_id=None) -> str:
    with engine.begin() as conn:
        return _insert_key(conn, company_id, user_id, name, scope)


def _insert_key(conn, company_id, user_id, name: str, scope: str) -> str:
    secret, prefix, digest = new_api_key()
    conn.execute(
        api_keys.insert().values(id=new_id(), company_id=company_id, user_id=user_id, name=name,
                                 prefix=prefix, key_hash=digest, scope=scope)
    )
    return secret


# Built once: every authenticated request runs it.
_KEY_BY_HASH = select(api_keys.c.id, api_keys.c.company_id, api_keys.c.user_id,
                      api_keys.c.scope, api_keys.c.revoked_at).where(
    api_keys.c.key_hash == bindparam("key_hash"))


def authenticate(engine, secret: str | None) -> Principal:
    """The principal behind a presented key; Unauthorized for a missing, unknown or revoked one."""
    if secret is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    if not secret:
        raise Unauthorized("Invalid API key.")
    # A read alone (no BEGIN, no ROLLBACK): it runs on every request. Not cached, so a
    # revoked key is refused on its next request, in every API process.
    with autocommit(engine) as conn:
        row = conn.execute(_KEY_BY_HASH, {"key_hash": hash_api_key(secret)}).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("Invalid API key.")
    return Principal(row.company_id, row.user_id, row.id, row.scope)


def user_in_company(engine, user_id, company_id) -> bool:
    """Whether `user_id` (any string) names a user of the company."""
    try:
        user_id = uuid.UUID(str(user_id))
    except ValueError:
        return False
    with autocommit(engine) as conn:
        return conn.execute(select(users.c.id).where(
            users.c.id == user_id, users.c.company_id == company_id)).first() is not None


def revoke_api_key(engine, key_id) -> None:
    with engine.begin() as conn:
        conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=utcnow()))
