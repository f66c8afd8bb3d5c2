"""`pipeline streams`: the streams catalog (docs/streams.md). `list` and `check` read the
file alone; `plan` compares it with the database and prints what `pipeline migrate` would
run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import TYPE_CHECKING

from pipeline.commands._common import OK, Subparsers, config_option, load_config

if TYPE_CHECKING:
    from pipeline.catalog import Column

_FILE_HELP = "a streams catalog file (default: PIPELINE_STREAMS_FILE; unset: the built-in streams)"


def register(commands: Subparsers) -> None:
    streams = commands.add_parser(
        "streams",
        help="the streams catalog: list its streams, check a file, plan the tables",
    )
    actions = streams.add_subparsers(required=True, metavar="ACTION")
    list_parser = actions.add_parser(
        "list", help="each stream: topic, table, mode, key, columns, built-in or its file"
    )
    list_parser.add_argument("file", nargs="?", metavar="FILE", help=_FILE_HELP)
    list_parser.add_argument("--json", action="store_true", help="the declarations, as JSON")
    list_parser.set_defaults(handler=list_streams)
    check_parser = actions.add_parser(
        "check", help="check a catalog file: exit 0, or 2 with every error"
    )
    check_parser.add_argument("file", nargs="?", metavar="FILE", help=_FILE_HELP)
    check_parser.set_defaults(handler=check)
    plan_parser = actions.add_parser(
        "plan",
        help="print the SQL `pipeline migrate` would run for the catalog, or why it would "
        "refuse (exit 2)",
    )
    config_option(plan_parser)
    plan_parser.set_defaults(handler=plan)


def _file(args: argparse.Namespace) -> str:
    from pipeline.catalog import STREAMS_FILE_ENV

    given: str | None = args.file
    return given if given is not None else os.environ.get(STREAMS_FILE_ENV, "")


def list_streams(args: argparse.Namespace) -> int:
    from pipeline import catalog

    streams = catalog.load(_file(args))
    if args.json:
        print(json.dumps([{**s.declaration(), "builtin": s.builtin} for s in streams], indent=2))
        return OK
    for spec in streams:
        tables = spec.table + (f" + {spec.history_table}" if spec.history_table else "")
        facts = [f"topic {spec.topic}", f"table {tables}", spec.mode]
        if spec.key:
            facts.append(f"key ({', '.join(spec.key)})")
        if spec.version:
            facts.append(f"version {spec.version}")
        if spec.tombstones != "ignore":
            facts.append(f"tombstones {spec.tombstones}")
        facts.append(spec.origin)
        print(f"{spec.name}: {', '.join(facts)}")
        for column in spec.columns:
            print(f"    {column.name} {_column(column)}")
    return OK


def _column(column: Column) -> str:
    declared = column.declaration()
    parts = [column.type]
    if column.nullable:
        parts.append("nullable")
    if column.has_default:
        parts.append(f"default {json.dumps(declared['default'])}")
    if column.source != "value":
        parts.append(f"from {declared['source']}")
    elif column.path != (column.name,):
        parts.append(f"from {declared['path']}")
    if column.unit:
        parts.append(f"unit {column.unit}")
    return ", ".join(parts)


def check(args: argparse.Namespace) -> int:
    from pipeline import catalog

    path = _file(args)
    streams = catalog.load(path)
    where = path or "the built-in streams (no file given, PIPELINE_STREAMS_FILE is not set)"
    print(f"{where}: {len(streams)} stream(s) valid: {', '.join(streams.names)}")
    return OK


def plan(args: argparse.Namespace) -> int:
    """Read-only: any login that may read the catalog's tables will do; the migrator's
    (PIPELINE_MIGRATE_DATABASE_URL, else DATABASE_URL) is the one `pipeline migrate` uses."""
    from pipeline import db, schema_plan

    config = load_config(args)

    async def read() -> tuple[list[str], schema_plan.Plan]:
        conn = await db.connect(config.migration_url, config.db_session)
        try:
            return await db.plan_schema(conn, db.read_migrations(), config.catalog)
        finally:
            await conn.close()

    pending, found = asyncio.run(read())
    if not pending and found.empty:
        print("nothing to do")
        return OK
    if pending:
        print(f"-- the migrations not yet applied, first: {', '.join(pending)}")
    for line in found.script:
        print(line)
    return OK
