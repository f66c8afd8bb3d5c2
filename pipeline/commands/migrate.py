"""`pipeline migrate`: apply the sql/ migrations not yet applied, as the migrator
(docs/security.md)."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.commands._common import OK, Subparsers, config_option, load_config


def register(commands: Subparsers) -> None:
    parser = commands.add_parser("migrate", help="apply the sql/ migrations not yet applied")
    config_option(parser)
    parser.set_defaults(handler=migrate)


def migrate(args: argparse.Namespace) -> int:
    """Apply the migrations as the migrator (PIPELINE_MIGRATE_DATABASE_URL, else
    DATABASE_URL): the one command that changes the schema."""
    from pipeline import db

    config = load_config(args)

    async def apply() -> list[str]:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            return await db.migrate(conn, db.read_migrations())
        finally:
            await conn.close()

    applied = asyncio.run(apply())
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return OK
