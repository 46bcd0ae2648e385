"""Schema migrations (Alembic): bring a database, empty, older or made before them, to a revision.

Every database is made and changed by the revisions in versions/, on PostgreSQL and on
SQLite alike, so an embedded database made by an earlier version is upgraded in place.
0001 is the first release's schema; each later revision is what a release added.
`schema.sql` (the repository's root) stays the readable PostgreSQL schema at head and is
never run: tests/test_migrations.py holds head to it, to pipeline/tables.py (the
models), and an upgraded database to a fresh one.

A database made before migrations (by schema.sql or create_all) has the tables but no
alembic_version: it is adopted, stamped at the newest revision whose columns it already
has, then upgraded. Runs are serialised by a PostgreSQL advisory lock (the one `db init`
always took) or SQLite's write lock (BEGIN IMMEDIATE), and done in one transaction.

A new revision: `alembic.command.revision(config(), "what it adds", rev_id="0004")`
writes versions/0004_*.py from script.py.mako; the tests then say where it and the
models disagree. Use `op.batch_alter_table` for what SQLite's ALTER cannot do (drop or
change a column): foreign keys are off on SQLite while migrations run, and checked after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from pipeline.errors import PipelineError

SCRIPTS = Path(__file__).resolve().parent
# The newest revision in versions/ (a test checks), known without loading Alembic, so a
# process whose database is already there never imports it.
HEAD = "0006"
LOCK_KEY = 7240001

# What shows, in a database made before migrations, that it has a revision's changes:
# newest first. Without any of them it is at the first release's schema, BASELINE.
LEGACY_MARKERS = (
    ("0003", {"idempotency_keys": {"lease_token", "lease_expires_at", "job_id"}}),
    ("0002", {"jobs": {"provider_pinned", "wake_at", "deadline_at"}}),
)
BASELINE = "0001"

# Alembic keeps the run in progress in module globals (`op`, `context`): one at a time in a
# process, whatever the database.
_ONE_RUN = threading.Lock()


class MigrationError(PipelineError):
    """The database cannot be brought to the revision asked for; nothing was changed."""

    code = "MIGRATION_ERROR"


@dataclass(frozen=True)
class Migrated:
    """What a run did: from `before` (None: an empty database) to `after`."""

    before: str | None
    after: str | None
    adopted: bool = False  # made before migrations, stamped at `before` first

    @property
    def changed(self) -> bool:
        return self.before != self.after or self.adopted


def config(connection: Connection | None = None):
    """Alembic's configuration, built here rather than read from an alembic.ini, so it
    works from an installed wheel: env.py runs the revisions on `connection`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = connection
    return cfg


def current(conn: Connection) -> str | None:
    """The revision the database is at; None when it has no version (empty, or made
    before migrations)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> Migrated:
    """Bring the database to `revision` (idempotent). A database already there is only
    read, without a lock, so calling this at every start costs a query or two."""
    with engine.connect() as conn:
        before = current(conn)
    if before == (HEAD if revision == "head" else revision):
        return Migrated(before, before)
    from alembic import command

    with _alembic_errors(), _locked(engine) as conn:
        before, adopted = current(conn), False  # another process may have done it meanwhile
        if before is None and inspect(conn).has_table("companies"):
            before, adopted = legacy_revision(conn), True
            command.stamp(config(conn), before)
        try:
            command.upgrade(config(conn), revision)
        except DBAPIError as exc:
            if not adopted:
                raise
            raise MigrationError(
                f"this database was made before migrations, and is not the schema of revision "
                f"{before} that its columns suggest ({str(exc.orig).strip()}); nothing was "
                "changed", details={"revision": before}) from exc
        return Migrated(before, current(conn), adopted)


def downgrade(engine: Engine, revision: str) -> Migrated:
    """Take the database back to `revision`, dropping what later revisions added (their
    data with it): for a release rolled back by hand, and for the tests of each revision."""
    from alembic import command

    with _alembic_errors(), _locked(engine) as conn:
        before = current(conn)
        command.downgrade(config(conn), revision)
        return Migrated(before, current(conn))


def legacy_revision(conn: Connection) -> str:
    """The revision a database made before migrations is at, read from its columns."""
    insp = inspect(conn)
    for revision, marks in LEGACY_MARKERS:
        if all(insp.has_table(table)
               and columns <= {c["name"] for c in insp.get_columns(table)}
               for table, columns in marks.items()):
            return revision
    return BASELINE


@contextmanager
def _alembic_errors() -> Iterator[None]:
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:  # an unknown revision, say one a newer release wrote
        raise MigrationError(str(exc)) from None


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """One transaction that no other migration run can enter until it ends."""
    sqlite = engine.dialect.name == "sqlite"
    with _ONE_RUN, engine.connect() as conn:
        if sqlite:
            # Batch mode copies a table to change it, which foreign keys would refuse; the
            # pragma is ignored inside a transaction, so it is set before BEGIN IMMEDIATE.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
                yield conn
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise MigrationError("the migration left rows whose foreign keys point "
                                         "nowhere; rolled back")
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
