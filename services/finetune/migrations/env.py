"""Alembic environment of the finetune store: see shared/migrations.py (own version table: alembic_version_finetune)."""

from shared.migrations import run_env

run_env("finetune")
