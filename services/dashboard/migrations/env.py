"""Alembic environment of the dashboard store: see shared/migrations.py (own version table: alembic_version_dashboard)."""

from shared.migrations import run_env

run_env("dashboard")
