"""pipeline/db.py's connection handling on real PostgreSQL: a pooled connection the
server dropped while it sat idle is replaced before use, and `autocommit` sends no
transaction around its statement (each one is committed on its own)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from pipeline import db
from pipeline.db import autocommit, make_engine
from tests.builders import auth

pytestmark = pytest.mark.postgres


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(pg_url: str, pid: int) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_killed_while_idle_is_replaced_before_use(empty_pg_database,
                                                               monkeypatch):
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checkout is "idle"
    engine = make_engine(empty_pg_database, pool_size=1)
    try:
        first = _backend_pid(engine)
        _terminate(empty_pg_database, first)  # a database restart, as the pool sees it
        assert _backend_pid(engine) != first  # no error: the dead one was not handed out
    finally:
        engine.dispose()


def test_a_connection_in_steady_use_is_not_pinged(empty_pg_database):
    """Within PING_AFTER_IDLE_SECONDS the pool hands the connection out unchecked: the
    statement after a kill fails (and the step retries), the pool then drops it."""
    engine = make_engine(empty_pg_database, pool_size=1)
    try:
        first = _backend_pid(engine)
        _terminate(empty_pg_database, first)
        with pytest.raises(Exception, match=r"terminat|closed|server"):
            _backend_pid(engine)
        assert _backend_pid(engine) != first
    finally:
        engine.dispose()


def test_autocommit_commits_each_statement_without_a_transaction(empty_pg_database):
    engine = make_engine(empty_pg_database, pool_size=1)
    try:
        with autocommit(engine) as conn:
            conn.execute(text("CREATE TABLE t (n int)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            # Each statement is a transaction of its own (it started when the statement
            # did), and what ran is already visible to every other session.
            assert conn.execute(text("SELECT now() = statement_timestamp()")).scalar_one()
            with psycopg.connect(empty_pg_database) as other:
                assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 1
        with engine.begin() as conn:  # the pool's connection is transactional again
            conn.execute(text("INSERT INTO t VALUES (2)"))
            assert not conn.execute(text("SELECT now() = statement_timestamp()")).scalar_one()
    finally:
        engine.dispose()


def test_the_api_answers_a_dropped_connection_with_a_retryable_503(api_stack):
    """A request that meets a connection the server dropped (a restart) gets 503
    DATABASE_UNAVAILABLE with Retry-After, never a 500; the next request is served."""
    # Without rate limits the gate's authentication is the request's first statement (the
    # limiter's filter would meet the dead connection first and leave it to the gate).
    env, rt, client, company = api_stack(5, RATE_LIMITS_ENABLED="0")
    engine = rt.engine
    engine.dispose()  # one pooled connection from here on, so the request gets the killed one
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    first = client.get("/v1/wallet", headers=auth(company.api_key))
    assert first.status_code == 503, first.get_json()
    assert first.get_json()["code"] == "DATABASE_UNAVAILABLE"
    assert first.headers["Retry-After"] == "1"
    assert client.get("/v1/wallet", headers=auth(company.api_key)).status_code == 200
