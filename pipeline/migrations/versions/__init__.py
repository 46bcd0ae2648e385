"""Alembic revisions, one file each, loaded by Alembic from their paths."""
