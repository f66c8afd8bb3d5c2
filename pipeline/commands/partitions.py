"""`pipeline partitions`: maintain the time partitions of the catalog's partitioned tables
(create ahead, move rows out of DEFAULT, drop by retention) and list them
(docs/operations.md, "Partitions and retention")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import re
import signal
import sys
from typing import TYPE_CHECKING, Any

from pipeline.commands._common import (
    FAILED,
    OK,
    Subparsers,
    check_streams,
    config_option,
    load_config,
    stream_list,
)

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.partition_maint import TableResult, Target

_DURATION = re.compile(r"([1-9][0-9]*)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """An argparse type: ``90s``, ``30m``, ``1h``, ``1d`` in seconds."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30m, 1h or 1d, got {text!r}")
    return int(found[1]) * _SECONDS[found[2]]


def moment(text: str) -> datetime.datetime:
    """An argparse type: an ISO 8601 time, UTC unless it says otherwise."""
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "partitions",
        help="time partitions of the partitioned tables: maintain, list",
        description="A stream declared with partition_by lands in a table partitioned by "
        "time, with a DEFAULT partition for rows whose range has no partition yet. "
        "`maintain` makes the partitions ahead, moves rows out of DEFAULT and drops what the "
        "retention expired; `list` shows them.",
    )
    actions = parser.add_subparsers(required=True, metavar="ACTION")
    maintain_parser = actions.add_parser(
        "maintain",
        help="make partitions ahead, move rows out of DEFAULT, drop expired partitions",
        description="One pass per partitioned table, as the migrator "
        "(PIPELINE_MIGRATE_DATABASE_URL, else DATABASE_URL): make the partitions up to "
        "partitions_ahead; give the rows in DEFAULT partitions of their own, one transaction "
        "per range (rows older than the retention are deleted and counted instead); detach "
        "and drop the partitions wholly older than the retention. Every step is idempotent, "
        "waits for a table lock for at most a second (then tries again), and one lock makes "
        "maintainers take turns. Each table's pass is recorded in partition_maintenance. "
        "Exit status 1 when a table's pass failed.",
    )
    config_option(maintain_parser)
    maintain_parser.add_argument(
        "--every",
        type=duration,
        metavar="DURATION",
        help="keep running, a pass every DURATION (30m, 1h, 1d) until SIGTERM or SIGINT; a "
        "failed pass is logged and tried again at the next",
    )
    maintain_parser.add_argument(
        "--stream",
        type=stream_list,
        action="append",
        dest="streams",
        metavar="NAME",
        help="only these streams' tables (repeat, or a comma list; default: every "
        "partitioned stream)",
    )
    # Tests simulate time passing: the pass reckons with this time instead of the clock.
    maintain_parser.add_argument("--now", type=moment, help=argparse.SUPPRESS)
    maintain_parser.set_defaults(handler=maintain)
    list_parser = actions.add_parser(
        "list",
        help="each partitioned table's partitions: ranges, rows, sizes, rows in DEFAULT",
        description="Per partitioned table: each partition's range, estimated rows (from "
        "the last ANALYZE) and size, the rows in DEFAULT (counted, up to 1,000,000), the "
        "oldest and newest range, and the last maintenance. Runs as the agents' login "
        "(DATABASE_URL): any role that may read the tables (pipeline_reader, "
        "pipeline_writer) will do.",
    )
    config_option(list_parser)
    list_parser.add_argument(
        "--stream",
        type=stream_list,
        action="append",
        dest="streams",
        metavar="NAME",
        help="only these streams' tables (repeat, or a comma list)",
    )
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")
    list_parser.set_defaults(handler=list_)


def _targets(config: Config, streams: list[tuple[str, ...]] | None) -> list[Target]:
    from pipeline.errors import ConfigError
    from pipeline.partition_maint import targets

    names = None if streams is None else [n for group in streams for n in group]
    if names is not None:
        check_streams("--stream", names, config)
        flat = [n for n in names if config.catalog[n].partitioning is None]
        if flat:
            raise ConfigError(f"--stream: not partitioned (no partition_by): {', '.join(flat)}")
    return targets(config.catalog, names)


def _say(line: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"{stamp} {line}", flush=True)


async def run_pass(
    config: Config, tables: list[Target], now: datetime.datetime | None
) -> list[TableResult]:
    """One maintenance pass as the migrator, on a connection of its own."""
    from pipeline import db, partition_maint

    conn = await db.connect(config.migration_url, config.db_session)
    try:
        await db.check_schema(conn)  # partition_maintenance is there
        when = now or datetime.datetime.now(datetime.UTC)
        pooled = config.db_session.pooler == "transaction"
        return await partition_maint.maintain(conn, tables, when, _say, session_lock=not pooled)
    finally:
        await conn.close()


def _summary(results: list[TableResult]) -> str:
    failed = [r.table for r in results if r.error is not None]
    moved = sum(r.rows_moved for r in results)
    expired = sum(r.rows_expired for r in results)
    line = (
        f"maintained {len(results) - len(failed)} table(s): "
        f"{sum(r.created for r in results)} partition(s) made ahead, "
        f"{sum(r.moved for r in results)} made for {moved} row(s) from DEFAULT, "
        f"{sum(r.dropped for r in results)} dropped, {expired} expired row(s) deleted"
    )
    return line + (f"; FAILED: {', '.join(failed)}" if failed else "")


def maintain(args: argparse.Namespace) -> int:
    config = load_config(args)
    tables = _targets(config, args.streams)
    if not tables:
        print("no partitioned table in the catalog: nothing to maintain")
        return OK
    if args.every is None:
        results = asyncio.run(run_pass(config, tables, args.now))
        _say(_summary(results))
        return FAILED if any(r.error for r in results) else OK
    asyncio.run(_every(config, tables, args.every, args.now))
    return OK


async def _every(
    config: Config, tables: list[Target], every_s: float, now: datetime.datetime | None
) -> None:
    """A pass every ``every_s`` until SIGTERM or SIGINT: a pass in progress is cancelled
    (each step is its own transaction: one cut short is rolled back whole)."""
    import asyncpg

    from pipeline.errors import PipelineError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _say(f"maintaining {', '.join(t.table for t in tables)} every {every_s:g}s")
    while not stop.is_set():
        work = asyncio.ensure_future(run_pass(config, tables, now))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            _say("stopping: the pass in progress is cancelled, its open step rolled back")
        try:
            _say(_summary(await work))
        except asyncio.CancelledError:
            break
        except (PipelineError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            _say(f"maintenance pass failed, tried again in {every_s:g}s: {exc}")
        finally:
            stopped.cancel()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancel.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await stop.wait()
    _say("stopped")


def list_(args: argparse.Namespace) -> int:
    config = load_config(args)
    tables = _targets(config, args.streams)
    shown = asyncio.run(_list(config, tables))
    if args.json:
        print(json.dumps({"tables": shown}))
        return OK
    if not shown:
        print("no partitioned table in the catalog")
    for table in shown:
        _print_table(table)
    return OK


async def _list(config: Config, tables: list[Target]) -> list[dict[str, Any]]:
    from pipeline import db, partition_maint, partitions

    conn = await db.connect(config.database_url, config.db_session)
    shown = []
    try:
        await db.check_schema(conn)
        async with db.transaction(conn):
            await conn.execute("SET LOCAL TimeZone = 'UTC'")
            last = {
                r["table_name"]: r for r in await conn.fetch("SELECT * FROM partition_maintenance")
            }
            for target in tables:
                found = await partition_maint.read_partitions(conn, target.table)
                ranged = [p for p in found if p.range is not None]
                in_default = await partition_maint.count_default(
                    conn, target, partition_maint.LIST_COUNT_CAP
                )
                record = last.get(target.table)
                shown.append(
                    {
                        "stream": target.stream,
                        "table": target.table,
                        "column": target.column,
                        "interval": target.partitioning.interval,
                        "partitions_ahead": target.partitioning.ahead,
                        "retention": partitions.format_retention(target.partitioning.retention),
                        "partitions": [
                            {
                                "name": p.name,
                                "from": _bound(p.range.start),
                                "to": _bound(p.range.end),
                                "estimated_rows": p.estimated_rows,
                                "bytes": p.bytes,
                            }
                            for p in ranged
                            if p.range is not None
                        ],
                        "default": {
                            "name": partitions.default_name(target.table),
                            "rows": in_default,
                            "rows_capped": in_default >= partition_maint.LIST_COUNT_CAP,
                        },
                        "oldest": _range(ranged[0].range) if ranged else None,
                        "newest": _range(ranged[-1].range) if ranged else None,
                        "last_maintenance": _maintenance(record),
                    }
                )
    finally:
        await conn.close()
    return shown


def _bound(moment: datetime.datetime) -> str:
    from pipeline import partitions

    if moment == partitions.MINVALUE:
        return "MINVALUE"
    if moment == partitions.MAXVALUE:
        return "MAXVALUE"
    return moment.isoformat()


def _range(range_: Any) -> dict[str, str]:
    return {"from": _bound(range_.start), "to": _bound(range_.end)}


def _maintenance(record: Any) -> dict[str, Any] | None:
    if record is None:
        return None

    def when(at: Any) -> str | None:
        return None if at is None else str(at.isoformat())

    return {
        "last_success_at": when(record["last_success_at"]),
        "last_attempt_at": when(record["last_attempt_at"]),
        "last_error": record["last_error"],
        "partitions_created": record["partitions_created"],
        "partitions_moved": record["partitions_moved"],
        "partitions_dropped": record["partitions_dropped"],
        "rows_moved": record["rows_moved"],
        "rows_expired": record["rows_expired"],
    }


def _print_table(table: dict[str, Any]) -> None:
    out = sys.stdout
    default = table["default"]
    rows = f"{default['rows']}{'+' if default['rows_capped'] else ''}"
    print(
        f"{table['table']} (stream {table['stream']}): by {table['interval']} of "
        f"{table['column']}, {len(table['partitions'])} partition(s), "
        f"{table['partitions_ahead']} ahead, retention {table['retention']}",
        file=out,
    )
    for p in table["partitions"]:
        estimate = "?" if p["estimated_rows"] is None else f"~{p['estimated_rows']}"
        print(
            f"  {p['name']}  [{p['from']}, {p['to']})  {estimate} rows  {p['bytes']} bytes",
            file=out,
        )
    print(f"  {default['name']}  DEFAULT  {rows} rows", file=out)
    last = table["last_maintenance"]
    if last is None:
        print("  never maintained: run `pipeline partitions maintain`", file=out)
    else:
        error = f"; last error: {last['last_error']}" if last["last_error"] else ""
        print(f"  last maintained {last['last_success_at'] or 'never'}{error}", file=out)
