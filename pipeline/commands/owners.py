"""`pipeline owners`: which group owns each data table, and releasing a group's tables
(one group per table: docs/exactly-once.md)."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from pipeline.commands._common import OK, Subparsers, config_option, load_config

if TYPE_CHECKING:
    from pipeline.db import TableOwner


def register(commands: Subparsers) -> None:
    owners = commands.add_parser(
        "owners",
        help="which group owns each data table (one group per table, docs/exactly-once.md)",
    )
    actions = owners.add_subparsers(required=True, metavar="ACTION")
    show_parser = actions.add_parser("show", help="every claimed table, its group, topic")
    config_option(show_parser)
    show_parser.set_defaults(handler=show)
    release_parser = actions.add_parser(
        "release",
        help="as the migrator: hand back a group's tables, for another group to claim "
        "(stop that group's agents and replays first)",
    )
    config_option(release_parser)
    release_parser.add_argument("--group", required=True, help="the group whose tables to release")
    release_parser.set_defaults(handler=release)


def show(args: argparse.Namespace) -> int:
    from pipeline import db

    config = load_config(args)

    async def read() -> list[TableOwner]:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            await db.check_schema(conn)
            return await db.table_owners(conn)
        finally:
            await conn.close()

    found = asyncio.run(read())
    if not found:
        print("no data table is claimed yet: the first group to write one claims it")
    for owner in found:
        print(f"{owner.table}: group {owner.group}, topic {owner.topic}")
    return OK


def release(args: argparse.Namespace) -> int:
    """As the migrator (PIPELINE_MIGRATE_DATABASE_URL, else DATABASE_URL): the writer may
    claim a table, never hand one over."""
    from pipeline import db

    config = load_config(args)

    async def release_tables() -> list[TableOwner]:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            await db.check_schema(conn)
            return await db.release_tables(conn, args.group)
        finally:
            await conn.close()

    released = asyncio.run(release_tables())
    if not released:
        print(f"group {args.group} owns no table: nothing to release")
    for owner in released:
        print(f"released {owner.table} (group {owner.group}, topic {owner.topic})")
    return OK
