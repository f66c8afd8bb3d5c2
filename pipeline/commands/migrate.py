"""`pipeline migrate`: apply the sql/ migrations not yet applied, then the streams catalog's
tables, as the migrator (docs/security.md, docs/streams.md)."""

from __future__ import annotations

import argparse
import asyncio

from pipeline.commands._common import OK, Subparsers, config_option, load_config


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "migrate",
        help="apply the sql/ migrations not yet applied and the streams catalog's tables",
        description=(
            "Apply the numbered migrations not yet applied, then what the streams catalog "
            "(PIPELINE_STREAMS_FILE) needs: new tables, new columns, indexes. All in one "
            "transaction; then, online, each existing table the catalog now partitions "
            "(docs/streams.md). A change it does not make (a type change, a removed column, a "
            "new key) is refused before anything changes, and every one is named. `pipeline "
            "streams plan` prints the statements first."
        ),
    )
    config_option(parser)
    parser.set_defaults(handler=migrate)


def migrate(args: argparse.Namespace) -> int:
    """Apply the migrations and the catalog as the migrator (PIPELINE_MIGRATE_DATABASE_URL,
    else DATABASE_URL): the one command that changes the schema."""
    from pipeline import db

    config = load_config(args)

    async def apply() -> db.Migrated:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            return await db.migrate_schema(conn, db.read_migrations(), config.catalog)
        finally:
            await conn.close()

    migrated = asyncio.run(apply())
    if migrated.nothing:
        print("the schema is up to date")
        return OK
    if migrated.migrations:
        print("applied: " + ", ".join(migrated.migrations))
    for action in migrated.plan.actions:
        print(action)
    if migrated.recorded:
        print("recorded the catalog of: " + ", ".join(migrated.recorded))
    return OK
