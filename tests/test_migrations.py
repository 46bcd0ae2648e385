"""Migrations: an upgraded database is the one a fresh upgrade makes, on PostgreSQL and on
SQLite; head is schema.sql and the models; databases made before migrations are adopted;
runs at once do not race; `pipeline db upgrade` says what it did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, select

from pipeline import tables
from pipeline.db import init_db, make_engine
from pipeline.migrations import (
    HEAD,
    Migrated,
    MigrationError,
    config,
    current,
    downgrade,
    upgrade,
)
from tests.conftest import ROOT, _scratch_database

BACKENDS = [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]
EARLIER = ("0001", "0002", "0003", "0004", "0005")  # every revision before head
HAS_PG_DUMP = shutil.which("pg_dump") is not None


@dataclass
class Database:
    url: str
    engine: Engine


def _new_database(backend: str, stack: ExitStack, folder: Path) -> Database:
    if backend == "postgresql":
        url = stack.enter_context(_scratch_database("mig"))
    else:
        url = f"sqlite:///{folder}/{uuid.uuid4().hex[:8]}.db"
    engine = make_engine(url)
    stack.callback(engine.dispose)
    return Database(url, engine)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def new_database(backend, tmp_path):
    """new_database() -> an empty database of the test's backend, dropped at the end."""
    with ExitStack() as stack:
        yield lambda: _new_database(backend, stack, tmp_path)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """fresh(backend) -> (shape, pg_dump) of an empty database upgraded to head, made once."""
    made: dict[str, tuple] = {}
    with ExitStack() as stack:
        def get(backend: str) -> tuple:
            if backend not in made:
                db = _new_database(backend, stack, tmp_path_factory.mktemp("fresh"))
                assert upgrade(db.engine) == Migrated(None, HEAD)
                made[backend] = (shape(db.engine), pg_dump(db))
            return made[backend]

        yield get


def shape(engine: Engine) -> dict:
    """Everything the schema says, per table, as the database reports it."""
    insp = inspect(engine)
    found = {}
    for name in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        found[name] = {
            "columns": {c["name"]: (str(c["type"].compile(dialect=engine.dialect)),
                                    c["nullable"], c["default"])
                        for c in insp.get_columns(name)},
            "primary key": insp.get_pk_constraint(name)["constrained_columns"],
            "unique": {u["name"]: u["column_names"] for u in insp.get_unique_constraints(name)},
            "checks": {c["name"]: c["sqltext"] for c in insp.get_check_constraints(name)},
            "indexes": {i["name"]: (i["column_names"], i["unique"])
                        for i in insp.get_indexes(name) if not i.get("duplicates_constraint")},
            "foreign keys": sorted((f["constrained_columns"], f["referred_table"],
                                    f["referred_columns"]) for f in insp.get_foreign_keys(name)),
        }
    return found


def pg_dump(db: Database) -> str | None:
    """PostgreSQL's own account of the schema, column order included (None on SQLite)."""
    if not db.url.startswith("postgresql") or not HAS_PG_DUMP:
        return None
    out = subprocess.run(["pg_dump", "--schema-only", "--no-owner",
                          "--exclude-table=alembic_version", db.url],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    # Comments and the per-dump random \restrict key are not part of the schema.
    return "\n".join(line for line in out.splitlines()
                     if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict")))


def model_drift(engine: Engine) -> list:
    """What autogenerate would write to make the database match pipeline/tables.py."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        return compare_metadata(context, tables.metadata)


def apply_schema_sql(db: Database) -> None:
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute((ROOT / "schema.sql").read_text())


# Rows written with only the columns the first release had, so they fit any revision.
def write_rows(engine: Engine) -> dict:
    ids = {"company": uuid.uuid4(), "wallet": uuid.uuid4(), "job": uuid.uuid4()}
    with engine.begin() as conn:
        conn.execute(tables.companies.insert().values(id=ids["company"], name="made earlier"))
        conn.execute(tables.wallets.insert().values(
            id=ids["wallet"], company_id=ids["company"], credits_available=Decimal("12.345678")))
        conn.execute(tables.jobs.insert().values(
            id=ids["job"], company_id=ids["company"], provider="local", content_type="text",
            prompt="a haiku", status="queued", estimated_cost=Decimal("1.5")))
        conn.execute(tables.idempotency_keys.insert().values(
            company_id=ids["company"], key="key-1", request_hash="h",
            expires_at=datetime.now(UTC) + timedelta(hours=1)))
    return ids


def assert_rows_kept(engine: Engine, ids: dict) -> None:
    with engine.connect() as conn:
        job = conn.execute(select(tables.jobs).where(tables.jobs.c.id == ids["job"])).one()
        wallet = conn.execute(select(tables.wallets)).one()
        key = conn.execute(select(tables.idempotency_keys)).one()
    assert (job.status, job.estimated_cost, job.prompt) == ("queued", Decimal("1.5"), "a haiku")
    assert (job.provider_pinned, job.wake_at, job.deadline_at) == (False, None, None)
    assert wallet.credits_available == Decimal("12.345678")
    assert (key.key, key.lease_token, key.lease_expires_at, key.job_id) == ("key-1", None, None,
                                                                           None)


def test_head_names_the_newest_revision():
    scripts = ScriptDirectory.from_config(config())
    assert scripts.get_current_head() == HEAD
    assert [s.revision for s in scripts.walk_revisions()] == [HEAD, *reversed(EARLIER)]


@pytest.mark.parametrize("start", EARLIER)
def test_an_upgrade_from_an_earlier_revision_leaves_the_database_a_fresh_one_is(
        backend, new_database, fresh, start):
    db = new_database()
    assert upgrade(db.engine, start) == Migrated(None, start)
    ids = write_rows(db.engine)

    assert upgrade(db.engine) == Migrated(start, HEAD)
    fresh_shape, fresh_dump = fresh(backend)
    assert shape(db.engine) == fresh_shape
    assert pg_dump(db) == fresh_dump  # PostgreSQL: identical dumps, column order included
    assert_rows_kept(db.engine, ids)
    assert upgrade(db.engine) == Migrated(HEAD, HEAD)  # nothing left to do


@pytest.mark.postgres
def test_head_is_schema_sql_and_the_models_on_postgresql(fresh, tmp_path):
    with ExitStack() as stack:
        from_file = _new_database("postgresql", stack, tmp_path)
        apply_schema_sql(from_file)
        migrated = _new_database("postgresql", stack, tmp_path)
        upgrade(migrated.engine)
        assert shape(migrated.engine) == shape(from_file.engine)
        assert shape(migrated.engine) == fresh("postgresql")[0]
        if HAS_PG_DUMP:
            assert pg_dump(migrated) == pg_dump(from_file)
        assert model_drift(migrated.engine) == []


def test_head_is_the_models_on_sqlite(tmp_path):
    with ExitStack() as stack:
        migrated = _new_database("sqlite", stack, tmp_path)
        upgrade(migrated.engine)
        assert model_drift(migrated.engine) == []
        # What the embedded mode made before migrations: the models' own CREATE TABLEs.
        created = _new_database("sqlite", stack, tmp_path)
        tables.metadata.create_all(created.engine)
        assert shape(migrated.engine) == shape(created.engine)


def _drop_version(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE alembic_version")


def _made_before_migrations(db: Database, how: str) -> None:
    """A database as a version without migrations left it: tables, and no alembic_version."""
    if how == "schema.sql":  # the last of them, on PostgreSQL (`db init` ran schema.sql)
        apply_schema_sql(db)
    elif how == "create_all":  # the last of them, on SQLite
        tables.metadata.create_all(db.engine)
    else:  # an earlier version: the tables of that revision
        revision, _, extra = how.partition("+")
        upgrade(db.engine, revision)
        _drop_version(db.engine)
        if extra:  # create_all of a later version added its new tables, never its columns
            tables.provider_leases.create(db.engine)


@pytest.mark.parametrize(("backend", "how", "found_at"), [
    # The last version before migrations was at 0003 (schema.sql and create_all then).
    pytest.param("postgresql", "0003", "0003", marks=pytest.mark.postgres),
    pytest.param("postgresql", "0001", "0001", marks=pytest.mark.postgres),
    pytest.param("postgresql", "0002", "0002", marks=pytest.mark.postgres),
    ("sqlite", "0003", "0003"),
    ("sqlite", "0001", "0001"),
    ("sqlite", "0001+provider_leases", "0001"),
    ("sqlite", "0002", "0002"),
])
def test_a_database_made_before_migrations_is_adopted_and_upgraded(
        new_database, fresh, backend, how, found_at):
    db = new_database()
    _made_before_migrations(db, how)
    ids = write_rows(db.engine)

    assert upgrade(db.engine) == Migrated(found_at, HEAD, adopted=True)
    assert shape(db.engine) == fresh(backend)[0]
    assert_rows_kept(db.engine, ids)
    assert upgrade(db.engine) == Migrated(HEAD, HEAD)


def test_a_database_unlike_any_revision_is_refused_untouched(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/odd.db")
    tables.metadata.create_all(engine)
    tables.idempotency_keys.drop(engine)  # by its jobs columns, at 0002; 0003 cannot apply
    before = shape(engine)
    with pytest.raises(MigrationError, match=r"made before migrations.*revision 0002"):
        upgrade(engine)
    assert shape(engine) == before
    with engine.connect() as conn:
        assert current(conn) is None
    engine.dispose()


def test_downgrade_to_the_first_release_and_back_gives_the_same_database(
        backend, new_database, fresh):
    # On SQLite, dropping columns copies the table (batch mode): its constraints, indexes
    # and rows must come through, and foreign keys pointing at it must still hold.
    db = new_database()
    upgrade(db.engine)
    ids = write_rows(db.engine)
    assert downgrade(db.engine, "0001") == Migrated(HEAD, "0001")
    with db.engine.connect() as conn:
        assert "provider_pinned" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
    assert upgrade(db.engine) == Migrated("0001", HEAD)
    assert shape(db.engine) == fresh(backend)[0]
    assert_rows_kept(db.engine, ids)


def test_a_database_from_a_newer_release_is_refused_untouched(new_database):
    db = new_database()
    upgrade(db.engine)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(MigrationError, match="0099"):
        init_db(db.engine)
    with db.engine.connect() as conn:
        assert current(conn) == "0099"


RACE = """
import json, sys, time
from pipeline.db import init_db, make_engine
engine = make_engine(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
done = init_db(engine)
print(json.dumps([done.before, done.after]))
"""


def test_processes_initialising_one_database_at_once_do_not_race(backend, new_database,
                                                                  fresh, tmp_path):
    db = new_database()
    start = time.time() + 3  # after every process has imported what it needs
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, db.url, str(start)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    # One made the tables; the others waited for the lock and found them made.
    assert sorted(results, key=lambda r: r[0] or "") == [[None, HEAD]] + [[HEAD, HEAD]] * 2
    assert shape(db.engine) == fresh(backend)[0]
    with db.engine.connect() as conn:
        names = conn.execute(select(tables.providers.c.name)).scalars().all()
    assert len(names) == len(set(names)) > 0  # the price table seeded once


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "PIPELINE_DATA_DIR", "PIPELINE_ENV_FILE")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_db_upgrade_and_init_say_what_they_did(tmp_path):
    url = f"sqlite:///{tmp_path}/var/pipeline.db"
    steps = [
        (("db", "upgrade", "--revision", "0001"), "upgraded from empty to 0001"),
        (("db", "upgrade"), f"upgraded from 0001 to {HEAD}"),
        (("db", "upgrade"), f"already at revision {HEAD}"),
    ]
    for args, said in steps:
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == f"database {url}: {said}", args

    report = json.loads(_cli("db", "init", "--json", cwd=tmp_path).stdout)
    assert report == {"database": url, "from": HEAD, "to": HEAD, "adopted": False,
                      "changed": False, "status": "ready"}

    unknown = _cli("db", "upgrade", "--revision", "nope", cwd=tmp_path)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        "error: Can't locate revision identified by 'nope' (MIGRATION_ERROR)"]


def test_db_upgrade_adopts_an_embedded_database_made_before_migrations(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/var/pipeline.db")
    # The last version before migrations: 0003's tables, no alembic_version.
    upgrade(engine, "0003")
    _drop_version(engine)
    ids = write_rows(engine)
    engine.dispose()

    proc = _cli("db", "upgrade", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        # The last version before migrations had 0003's columns, never a later change.
        "database": f"sqlite:///{tmp_path}/var/pipeline.db", "from": "0003", "to": HEAD,
        "adopted": True, "changed": True}
    engine = make_engine(f"sqlite:///{tmp_path}/var/pipeline.db")
    assert_rows_kept(engine, ids)
    engine.dispose()
