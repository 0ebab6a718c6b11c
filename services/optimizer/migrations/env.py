"""Alembic environment of the optimizer store: see shared/migrations.py (own version table: alembic_version_optimizer)."""

from shared.migrations import run_env

run_env("optimizer")
