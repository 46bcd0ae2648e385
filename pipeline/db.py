"""Engines, schema setup (migrations, then the price table), and the few SQL helpers that
differ between PostgreSQL and SQLite."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DisconnectionError

from pipeline import tables
from pipeline.migrations import Migrated, upgrade

PRICES_JSON = Path(__file__).resolve().parent / "prices.json"


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware_utc(value: datetime | None) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite hands back naive ones)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def iso_utc(value: datetime | None) -> str | None:
    """A stored timestamp as ISO 8601 in UTC with a Z, as the API shows it."""
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        return value.isoformat() + "Z"
    return value.isoformat().replace("+00:00", "Z")


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def make_engine(database_url: str, *, pool_size: int = 5) -> Engine:
    """An engine for the URL; SQLite gets WAL and a busy timeout so processes can share it."""
    if database_url.startswith("postgresql://") or database_url.startswith("postgres://"):
        database_url = "postgresql+psycopg://" + database_url.split("://", 1)[1]
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # Autocommit at the driver level; SQLAlchemy's begin() issues BEGIN IMMEDIATE
            # below, so two writers queue on the lock instead of failing on upgrade.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(database_url, pool_size=pool_size, max_overflow=pool_size)
    _ping_when_idle(engine)
    return engine


# A pooled connection unused this long is pinged before it is handed out; one in steady
# use is not. SQLAlchemy's pool_pre_ping pings on every checkout: a round trip before
# each of a job's ~15 checkouts, for connections that answered milliseconds ago.
PING_AFTER_IDLE_SECONDS = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling for idle connections only.

    A database restart or a firewall's idle timeout kills connections while they sit in
    the pool; the first checkout after that finds them dead, and is given a fresh one.
    A connection that died while in steady use fails its statement instead, as it could
    with pre-ping too (between the ping and the statement); every step retries on
    OperationalError, and the pool drops the dead connections it finds then.
    """

    @event.listens_for(engine.pool, "checkin")
    def _idle_since(dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _ping_if_idle(dbapi_conn, record, proxy):
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # brand new, or used moments ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (up to 3 tries).
            raise DisconnectionError(f"pooled connection is gone: {exc}") from exc


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A connection for ONE statement, atomic on its own (a read, an UPDATE, a statement
    whose CTEs do several writes), or for reads that need not share a snapshot.

    On PostgreSQL each statement commits by itself: no BEGIN before it, no COMMIT or
    ROLLBACK after, two round trips fewer than `engine.begin()`. On SQLite it is
    `engine.begin()` (its statements take the file's lock either way).
    Never for two writes that must happen together: use `engine.begin()`.
    """
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def _switch_to_wal(cur, *, wait_s: float = 30.0) -> None:
    """WAL, kept in the file once set. Setting it on a new file needs the file alone, and
    SQLite refuses at once ("database is locked") rather than wait on busy_timeout while
    another process is creating the same file, as `db init` run twice at once does."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def insert_ignore(conn, table, values: dict, conflict_columns: list[str]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was written by this call."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=conflict_columns)
        # rowcount is not reliable for this statement across drivers; RETURNING is.
        .returning(table.c[conflict_columns[0]])
    )
    return conn.execute(stmt).first() is not None


def init_db(engine: Engine) -> Migrated:
    """Bring the schema to the newest revision and seed the provider price table; safe to
    run twice, and by several processes at once (pipeline.migrations holds the lock)."""
    done = upgrade(engine)
    seed_providers(engine)
    return done


def load_price_table() -> dict:
    data = json.loads(PRICES_JSON.read_text())
    return {name: entry for name, entry in data.items() if not name.startswith("_")}


def seed_providers(engine: Engine) -> None:
    """Insert any provider missing from the table; existing rows (operators' edits) are kept."""
    with engine.begin() as conn:
        known = set(conn.scalars(select(tables.providers.c.name)))
        for name, entry in load_price_table().items():
            if name in known:
                continue
            insert_ignore(
                conn,
                tables.providers,
                {
                    "id": new_id(),
                    "name": name,
                    "content_types": sorted(entry["pricing"]),
                    "pricing": entry["pricing"],
                    "config": entry.get("config", {}),
                },
                ["name"],
            )
