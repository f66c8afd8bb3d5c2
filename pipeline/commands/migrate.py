"""`pipeline migrate`: apply the sql/ migrations not yet applied, then the streams catalog's
tables, as the migrator (docs/security.md, docs/streams.md)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from typing import TYPE_CHECKING

from pipeline.commands._common import FAILED, OK, Subparsers, config_option, load_config

if TYPE_CHECKING:
    from pipeline.partition_maint import TableResult


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
            "streams plan` prints the statements first. Then one `pipeline partitions "
            "maintain` pass, so the partitioned tables have their partitions at once."
        ),
    )
    config_option(parser)
    parser.set_defaults(handler=migrate)


def migrate(args: argparse.Namespace) -> int:
    """Apply the migrations and the catalog as the migrator (PIPELINE_MIGRATE_DATABASE_URL,
    else DATABASE_URL): the one command that changes the schema."""
    from pipeline import db, partition_maint

    config = load_config(args)

    lines: list[str] = []

    async def apply() -> tuple[db.Migrated, list[TableResult]]:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            migrated = await db.migrate_schema(conn, db.read_migrations(), config.catalog)
            # A fresh or upgraded database gets its partitions now, not at the first pass of
            # a maintainer that may run only hours later.
            tables = partition_maint.targets(config.catalog)
            now = datetime.datetime.now(datetime.UTC)
            pooled = config.db_session.pooler == "transaction"
            return migrated, await partition_maint.maintain(
                conn, tables, now, lines.append, session_lock=not pooled
            )
        finally:
            await conn.close()

    migrated, maintained = asyncio.run(apply())
    failed = [r for r in maintained if r.error is not None]
    if migrated.nothing:
        print("the schema is up to date")
        return _maintenance_failed(lines, failed)
    if migrated.migrations:
        print("applied: " + ", ".join(migrated.migrations))
    for action in migrated.plan.actions:
        print(action)
    if migrated.recorded:
        print("recorded the catalog of: " + ", ".join(migrated.recorded))
    return _maintenance_failed(lines, failed)


def _maintenance_failed(lines: list[str], failed: list[TableResult]) -> int:
    """The maintenance pass's actions, on stderr (stdout says what changed in the schema);
    the schema is migrated either way, and a table whose partitions could not be made is
    named, with an exit status that says so (`pipeline partitions maintain` tries again)."""
    for line in lines:  # beside the schema's changes, as progress: what the pass made
        print(line, file=sys.stderr)
    for result in failed:
        print(
            f"pipeline: error: partitions of {result.table}: {result.error} "
            "(`pipeline partitions maintain` tries again)",
            file=sys.stderr,
        )
    return FAILED if failed else OK
