"""Alembic environment of the feedback store: see shared/migrations.py (own version table: alembic_version_feedback)."""

from shared.migrations import run_env

run_env("feedback")
