"""`pipeline replay`: a range of streams' records written again, exactly once, beside live
ingestion; `pipeline replay list` shows the replays (docs/replay.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from pipeline.commands._common import (
    OK,
    Subparsers,
    group_options,
    load_config,
    positive,
    progress,
    tune_garbage_collector,
)
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.replay import Progress


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "replay",
        help="write a range of streams' records again, exactly once, beside live ingestion",
        description="Read a range of streams' partitions again with a consumer of its own (no "
        "group) and write it with the DatabaseAgent's decoders and writers; progress is stored "
        "with the rows, so a replay killed at any point finishes exactly once with --resume. "
        "The end is frozen at start and clamped to the live group's stored offsets. Times are "
        "RFC 3339 with an explicit offset (2026-11-01T12:00:00Z). `pipeline replay list` shows "
        "the replays.",
    )
    parser.add_argument(
        "action", nargs="?", choices=["list"], help="list: every replay and its state"
    )
    group_options(parser)
    parser.add_argument(
        "--stream", action="append", metavar="S", help="repeatable or a comma list, e.g. metrics"
    )
    parser.add_argument("--from", dest="start", metavar="earliest|OFFSET|TIME")
    parser.add_argument("--to", dest="end", metavar="OFFSET|TIME|now", help="exclusive")
    parser.add_argument("--partitions", metavar="0,1", help="only these partitions (all)")
    parser.add_argument(
        "--database-url", metavar="URL", help="write to another database (DATABASE_URL)"
    )
    parser.add_argument(
        "--rate", type=positive(float), metavar="RECORDS_PER_S", help="at most this fast"
    )
    parser.add_argument(
        "--allow-gap",
        action="store_true",
        help="start at the log's first offset when retention deleted part of the range",
    )
    parser.add_argument("--resume", type=positive(int), metavar="ID", help="finish replay ID")
    parser.add_argument(
        "--batch-records",
        type=positive(int),
        metavar="N",
        help="records per transaction (PIPELINE_BATCH_MAX_RECORDS)",
    )
    parser.add_argument("--metrics-address", metavar="HOST:PORT", help="serve /metrics here (none)")
    parser.add_argument(
        "--json", action="store_true", help="the summary as one JSON object on stdout"
    )
    parser.set_defaults(handler=replay)


def replay(args: argparse.Namespace) -> int:
    from consumers.replay import Replayer, Request, request_text
    from pipeline import kafka_clients
    from pipeline.replay import parse_partitions, parse_position, parse_streams

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args, group_id=args.group, database_url=args.database_url)
    if args.action == "list":
        _print_replays(config)
        return OK
    asyncio.run(kafka_clients.check_connection(config.kafka))
    tty = sys.stderr.isatty()

    def report(done: Progress, final: bool) -> None:
        if tty:
            print("\r" + done.bar(), end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            progress(done.line())

    replayer = Replayer(config, batch_records=args.batch_records, rate=args.rate, report=report)
    tune_garbage_collector()
    if args.metrics_address:
        try:
            replayer.metrics.serve(args.metrics_address)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--metrics-address {args.metrics_address}: {exc}") from None
    if args.resume is not None:
        if args.stream or args.start or args.end or args.partitions:
            raise ConfigError("--resume ID takes the replay's own range: give no other range")
        replay_id = args.resume
    else:
        missing = [f for f, v in (("--stream", args.stream), ("--from", args.start),
                                  ("--to", args.end)) if not v]  # fmt: skip
        if missing:
            raise ConfigError(f"pipeline replay needs {', '.join(missing)} (or --resume ID)")
        request = Request(
            streams=parse_streams(args.stream, config.catalog),
            start=parse_position(args.start, side="from"),
            end=parse_position(args.end, side="to"),
            partitions=parse_partitions(args.partitions),
            allow_gap=args.allow_gap,
            text=request_text(
                streams=args.stream, start=args.start, end=args.end, partitions=args.partitions
            ),
        )
        replay_id, notes = asyncio.run(replayer.create(request))
        if not args.json:
            print(f"replay {replay_id} created", flush=True)
            for note in notes:
                print(f"  {note}", flush=True)
    summary = asyncio.run(replayer.run(replay_id))
    if args.json:
        print(json.dumps(summary.json()))
        return OK
    rate = summary.records / summary.seconds if summary.seconds else 0.0
    expired = sum(summary.expired.values())
    print(
        f"replay {replay_id} finished: {summary.records:,} records in {summary.seconds:.1f}s "
        f"({rate:,.0f}/s): {summary.rows:,} new rows, {summary.dead_letters:,} dead letters"
        + (f", {expired:,} expired rows skipped" if expired else "")
    )
    for line in summary.expired_lines():
        print(f"  {line}")
    return OK


def _print_replays(config: Config) -> None:
    """`pipeline replay list`: every replay, its state and progress, and its notes."""
    from consumers.replay import list_replays
    from pipeline import db

    async def read() -> list[dict[str, Any]]:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            await db.check_schema(conn)
            return await list_replays(conn)
        finally:
            await conn.close()

    replays = asyncio.run(read())
    print(f"{'id':>4}  {'state':<8}  {'group':<16}  {'streams':<20}  progress  created")
    for r in replays:
        done = f"{r['done']:,}/{r['total']:,}"
        print(
            f"{r['id']:>4}  {r['state']:<8}  {r['group_id']:<16}  "
            f"{','.join(r['streams']):<20}  {done}  "
            f"{r['created_at'].isoformat(timespec='seconds')}"
            + (
                f"  finished {r['finished_at'].isoformat(timespec='seconds')}"
                if r["finished_at"]
                else ""
            )
        )
        for note in r["notes"]:
            print(f"      {note}")
