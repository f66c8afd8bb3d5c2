"""`pipeline gaps`: the records Kafka deleted before the group ingested them (ingest_gaps),
listed and acknowledged (docs/operations.md, "Records lost to retention")."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
from typing import TYPE_CHECKING, Any

from pipeline.commands._common import OK, Subparsers, group_options, load_config, positive
from pipeline.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.db import Connection
    from pipeline.gaps import RecordedGap


def register(commands: Subparsers) -> None:
    gaps = commands.add_parser(
        "gaps",
        help="records retention deleted before they were ingested: list, acknowledge",
        description="Each gap is a partition whose stored offset was below the log start: "
        "the records between were deleted by Kafka (retention) before the group ingested "
        "them. The DatabaseAgent records each one (table ingest_gaps) in the transaction "
        "that moves the offset past it, or when it stops the stream (PIPELINE_ON_GAP=stop). "
        "A gap stays unacknowledged, shown by `pipeline control status` and `pipeline top`, "
        "until someone acknowledges it.",
    )
    actions = gaps.add_subparsers(required=True, metavar="ACTION")
    list_parser = actions.add_parser("list", help="the group's gaps, oldest first")
    group_options(list_parser)
    list_parser.add_argument(
        "--unacknowledged", action="store_true", help="only the gaps not acknowledged yet"
    )
    list_parser.add_argument("--json", action="store_true", help="machine-readable output")
    list_parser.set_defaults(handler=list_)
    ack_parser = actions.add_parser(
        "ack",
        help="acknowledge gaps: someone decided what to do about the lost records",
        description="Mark gaps acknowledged, with who did it and when, as the agents' login "
        "(DATABASE_URL). Acknowledging does not restart a stream stopped on a gap: "
        "`pipeline control activate` does.",
    )
    group_options(ack_parser)
    which = ack_parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id",
        type=positive(int),
        action="append",
        dest="ids",
        metavar="N",
        help="a gap's id (repeat for several)",
    )
    which.add_argument("--all", action="store_true", help="every unacknowledged gap")
    ack_parser.add_argument("--by", help="who acknowledges (default: the user running this)")
    ack_parser.set_defaults(handler=ack)


async def _with_connection(config: Config, use: Any) -> Any:
    from pipeline import db

    conn: Connection = await db.connect(config.database_url, config.db_session)
    try:
        await db.check_schema(conn)
        return await use(conn)
    finally:
        await conn.close()


def list_(args: argparse.Namespace) -> int:
    from pipeline import db

    config = load_config(args, group_id=args.group)

    async def read(conn: Connection) -> list[RecordedGap]:
        return await db.recorded_gaps(conn, config.group_id, unacknowledged=args.unacknowledged)

    found: list[RecordedGap] = asyncio.run(_with_connection(config, read))
    if args.json:
        print(json.dumps({"group": config.group_id, "gaps": [_json(g) for g in found]}))
        return OK
    if not found:
        print(f"group {config.group_id}: no gap recorded")
    for gap in found:
        print(gap.line())
    return OK


def ack(args: argparse.Namespace) -> int:
    from pipeline import db

    config = load_config(args, group_id=args.group)
    by = args.by if args.by is not None else getpass.getuser()
    if not by:
        raise ConfigError("--by: say who acknowledges")

    async def acknowledge(conn: Connection) -> list[int]:
        return await db.acknowledge_gaps(conn, config.group_id, None if args.all else args.ids, by)

    done: list[int] = asyncio.run(_with_connection(config, acknowledge))
    if args.ids:
        missing = sorted(set(args.ids) - set(done))
        if missing:
            raise PipelineError(
                f"group {config.group_id}: no unacknowledged gap {', '.join(map(str, missing))}"
                + (f" (acknowledged {', '.join(map(str, done))})" if done else "")
            )
    print(
        f"acknowledged {len(done)} gap(s) of group {config.group_id}"
        + (f": {', '.join(map(str, done))}" if done else "")
    )
    return OK


async def unacknowledged(config: Config) -> dict[str, int] | str:
    """Records lost in the group's unacknowledged gaps, per stream, for `pipeline control
    status` and `pipeline top`; or why the database could not tell (one line)."""
    from pipeline import db
    from pipeline.gaps import unacknowledged_by_stream

    stream_of = config.catalog.topics(config.topic_prefix)

    async def read(conn: Connection) -> list[RecordedGap]:
        return await db.recorded_gaps(conn, config.group_id, unacknowledged=True)

    import asyncpg

    try:
        found: list[RecordedGap] = await _with_connection(config, read)
    except (PipelineError, OSError, asyncpg.PostgresError) as exc:
        # Shown, not raised: the rest of the view is still worth seeing.
        return f"unknown (database: {(str(exc).splitlines() or [type(exc).__name__])[0]})"
    return unacknowledged_by_stream(found, stream_of)


def _json(gap: RecordedGap) -> dict[str, Any]:
    def when(at: Any) -> str | None:
        return None if at is None else str(at.isoformat())

    return {
        "id": gap.id,
        "topic": gap.topic,
        "partition": gap.partition,
        "first_offset": gap.first_offset,
        "end_offset": gap.end_offset,
        "lost": gap.end_offset - gap.first_offset,
        "action": gap.action,
        "instance_id": gap.instance_id,
        "detected_at": when(gap.detected_at),
        "skipped_at": when(gap.skipped_at),
        "acknowledged_at": when(gap.acknowledged_at),
        "acknowledged_by": gap.acknowledged_by,
    }
