"""Alembic's environment: runs the revisions on the connection pipeline.migrations hands it."""

from __future__ import annotations

from alembic import context

from pipeline.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `pipeline db upgrade` (pipeline.migrations.upgrade), "
                       "which passes the connection and holds the migration lock")

# target_metadata lets autogenerate (and the drift tests) compare the models with the
# database; render_as_batch writes what SQLite's ALTER cannot do as batch operations.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
