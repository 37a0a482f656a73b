"""Persistence: sqlmodel tables, the async repository, alembic migrations."""
