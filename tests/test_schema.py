"""schema.sql and pipeline/tables.py describe the same database, and init is repeatable.

The migrations are held to both in tests/test_migrations.py."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import inspect
from sqlalchemy.dialects import postgresql

from pipeline import tables
from pipeline.db import init_db, make_engine
from tests.conftest import ROOT

pytestmark = pytest.mark.postgres


def _type(type_) -> str:
    return type_.compile(dialect=postgresql.dialect()).replace(" ", "").upper()


def _shape_from_db(engine) -> dict:
    insp = inspect(engine)
    shape = {}
    for name in insp.get_table_names():
        shape[name] = {
            "columns": {c["name"]: (_type(c["type"]), c["nullable"])
                        for c in insp.get_columns(name)},
            "unique": {u["name"]: tuple(u["column_names"])
                       for u in insp.get_unique_constraints(name)},
            "checks": {c["name"] for c in insp.get_check_constraints(name)},
            "indexes": {i["name"]: tuple(i["column_names"]) for i in insp.get_indexes(name)
                        if not i.get("duplicates_constraint")},
            "fks": {(tuple(f["constrained_columns"]), f["referred_table"])
                    for f in insp.get_foreign_keys(name)},
        }
    return shape


def _shape_from_metadata() -> dict:
    shape = {}
    for table in tables.metadata.sorted_tables:
        shape[table.name] = {
            "columns": {c.name: (_type(c.type), c.nullable)
                        for c in table.columns},
            "unique": {c.name: tuple(col.name for col in c.columns)
                       for c in table.constraints if c.__class__.__name__ == "UniqueConstraint"},
            "checks": {c.name for c in table.constraints
                       if c.__class__.__name__ == "CheckConstraint"},
            "indexes": {i.name: tuple(col.name for col in i.columns) for i in table.indexes},
            "fks": {((fk.parent.name,), fk.column.table.name) for fk in table.foreign_keys},
        }
    return shape


def test_schema_sql_matches_table_definitions(empty_pg_database):
    with psycopg.connect(empty_pg_database, autocommit=True) as conn:
        conn.execute((ROOT / "schema.sql").read_text())
    engine = make_engine(empty_pg_database)
    try:
        from_db, from_code = _shape_from_db(engine), _shape_from_metadata()
        assert sorted(from_db) == sorted(from_code)
        for name in from_code:
            for aspect in ("columns", "unique", "checks", "indexes", "fks"):
                assert from_db[name][aspect] == from_code[name][aspect], (name, aspect)
    finally:
        engine.dispose()


def test_init_is_safe_to_run_twice_and_seeds_prices_once(empty_pg_database):
    engine = make_engine(empty_pg_database)
    try:
        init_db(engine)
        init_db(engine)
        with engine.connect() as conn:
            names = conn.exec_driver_sql("SELECT name FROM providers").scalars().all()
        assert names.count("local") == 1
    finally:
        engine.dispose()


def test_credits_are_exact_numeric_in_postgres():
    column = tables.wallets.c.credits_available
    assert _type(column.type) == "NUMERIC(20,6)"


def test_embedded_sqlite_schema_has_every_table_of_the_definitions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    init_db(engine)
    assert set(inspect(engine).get_table_names()) == {*tables.metadata.tables, "alembic_version"}
    engine.dispose()
