"""Schema migrations: Alembic, one migration history per service, in `services/<name>/migrations/`, each with
its own version table (`alembic_version_<name>`) in that service's own store, applied when the store is
opened (API and worker start-up).

`migrate` decides, inside one write transaction (two processes starting together queue on the lock):
- an empty store: create every table of the current code and stamp it at the newest revision (Alembic's
  recipe for new databases: the current tables are by definition the newest schema);
- a store made by `create_all` before there were migrations (tables, no version table): stamp it at the
  baseline revision (today's schema as it was released), then upgrade;
- a versioned store: upgrade to the newest revision.

Adding a revision (see README, "Schema changes"):
    .venv/bin/python -m shared.migrations revision <service> -m "what changed"
writes a new file with the operations Alembic detects between the newest revision and the current tables;
read it, fix what autodetection misses (renames, data moves), and commit it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, MetaData, inspect

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: The revision every service's history starts with: the schema as `create_all` made it before migrations.
BASELINE = "0001"


def script_location(service: str) -> Path:
    return ROOT / "services" / service / "migrations"


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def has_migrations(service: str) -> bool:
    return (script_location(service) / "env.py").is_file()


def _config(service: str, connection: Connection | None, metadata: MetaData | None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location(service)))
    cfg.attributes["service"] = service
    cfg.attributes["connection"] = connection
    cfg.attributes["metadata"] = metadata
    return cfg


def run_env(service: str) -> None:
    """The body of every service's `migrations/env.py`: run the migrations on the connection `migrate`
    passes (online mode only; there is no SQL-script mode)."""
    from alembic import context

    cfg = context.config
    connection = cfg.attributes.get("connection")
    if connection is None:
        raise RuntimeError(f"run migrations through shared.migrations (python -m shared.migrations ... {service})")
    context.configure(
        connection=connection,
        target_metadata=cfg.attributes.get("metadata"),
        version_table=version_table(service),
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table instead
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def current_revision(connection: Connection, service: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": version_table(service)})
    return ctx.get_current_revision()


def migrate(engine: Engine, metadata: MetaData, service: str) -> str:
    """Bring `service`'s store to the newest schema; returns what was done ("created", "stamped+upgraded",
    "upgraded"). See the module docstring."""
    from alembic import command

    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)  # one line per start is enough
    with engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        cfg = _config(service, conn, metadata)
        if not tables - {version_table(service)}:
            metadata.create_all(conn)
            command.stamp(cfg, "heads")
            log.info("%s store: created at the newest schema", service)
            return "created"
        if version_table(service) not in tables:
            command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "heads")
            done = "stamped+upgraded"
        else:
            command.upgrade(cfg, "heads")
            done = "upgraded"
        missing = [t.name for t in metadata.sorted_tables if t.name not in set(inspect(conn).get_table_names())]
        if missing:
            # A table the code has and no revision creates (a revision is missing): create it, so the service
            # works, and say so. `tests/integration/test_migrations.py` fails until the revision is written.
            log.warning("%s store: tables %s have no migration revision; created them directly", service, missing)
            metadata.create_all(conn, tables=[metadata.tables[t] for t in missing])
        return done


def schema_drift(engine: Engine, metadata: MetaData) -> list[object]:
    """What differs between a store and the tables of the current code (Alembic's comparison); [] when none."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def include_name(name: str | None, type_: str, _parent: object) -> bool:
        return not (type_ == "table" and name is not None and name.startswith("alembic_version"))

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": include_name})
        return list(compare_metadata(ctx, metadata))


def service_metadata(service: str) -> MetaData:
    """The tables of a service's current code (its store module's `metadata`, with the shared tables)."""
    from shared.deadletter import dead_letter_table

    module = importlib.import_module(f"services.{service}.store")
    metadata: MetaData = module.metadata
    dead_letter_table(metadata)
    return metadata


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.migrations revision <service> -m "message"`: write a new revision for the difference
    between the newest revision and the current tables. `upgrade <service> --url URL`: migrate a store."""
    from alembic import command

    from shared.db import make_engine

    parser = argparse.ArgumentParser(prog="python -m shared.migrations")
    parser.add_argument("action", choices=("revision", "upgrade"))
    parser.add_argument("service")
    parser.add_argument("-m", "--message", default="schema change")
    parser.add_argument("--url", help="upgrade: the store's database URL")
    args = parser.parse_args(argv)
    metadata = service_metadata(args.service)
    if args.action == "upgrade":
        if not args.url:
            parser.error("upgrade needs --url")
        engine = make_engine(args.url)
        print(migrate(engine, metadata, args.service))
        engine.dispose()
        return 0
    with tempfile.TemporaryDirectory() as tmp:  # a store at the newest revision, to compare the code against
        engine = make_engine(f"sqlite:///{tmp}/revision.db")
        with engine.begin() as conn:
            command.upgrade(_config(args.service, conn, metadata), "heads")
        with engine.begin() as conn:
            command.revision(_config(args.service, conn, metadata), message=args.message, autogenerate=True)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
