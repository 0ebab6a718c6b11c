"""Alembic environment of the router store: see shared/migrations.py (own version table: alembic_version_router)."""

from shared.migrations import run_env

run_env("router")
