"""`pipeline dlq`: list, show and redrive dead letters (docs/repair.md).

A redrive decodes each pending dead letter of the group again with today's decoders
(``pipeline.rows.DECODERS``) and writes those that now pass with the DatabaseAgent's own
writers (``TableWriter``, through ``write_bisecting`` so the rows the database still rejects
are found), in chunks of one transaction each. In that transaction:

1. the group's work lock (``db.lock_group_work``): a data rollback to a checkpoint, which
   deletes rows and dead letters by source offset, runs one at a time with a redrive;
2. the chunk's pending letters, locked ``FOR UPDATE SKIP LOCKED``: another redrive skips
   them, and once this one commits they are no longer pending, so no letter is ingested twice;
3. the rows, carrying the letter's ``src_partition``/``src_offset`` and a reserved batch id;
4. the letters that landed marked redriven (``redriven_at``, ``redriven_batch_id``); the
   others keep their row with the new error class and reason. Both count an attempt.

A dry run does all of it in a transaction that is rolled back, so what it reports is what
the database would do today, and nothing changes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pipeline import db
from pipeline.batching import Row
from pipeline.config import Config
from pipeline.db import Connection, TableWriter
from pipeline.errors import DataError, PipelineError, SchemaError
from pipeline.records import STREAM_BY_NAME
from pipeline.redrive import (
    Filters,
    Outcome,
    decode_again,
    letter_lines,
    list_line,
    stored_headers,
    stream_of,
    stream_topics,
)
from pipeline.rows import DECODERS, RecordRejected

#: Letters per redrive transaction: bounds the locks held and the rows in memory.
CHUNK = 500
_DRY_RUN_BATCH_ID = 0  # a dry run rolls back: it reserves no batch id


async def _connect(config: Config) -> Connection:
    conn = await db.connect(config.database_url, config.db_session)
    try:
        await db.check_schema(conn)  # `pipeline migrate` changes it, not a redrive
    except BaseException as exc:
        await conn.close()
        error = db.classify(exc)
        if isinstance(error, PipelineError) and error is not exc:
            raise PipelineError(f"checking the schema: {error}") from exc
        raise
    return conn


def _where(config: Config, filters: Filters, *, pending: bool) -> tuple[str, list[Any]]:
    """The WHERE clause of the filtered letters of the group, and its arguments ($1...)."""
    topics = list(stream_topics(config.topic_prefix, filters.stream))
    clauses = ["group_id = $1", "src_topic = ANY($2::text[])"]
    args: list[Any] = [config.group_id, topics]
    if pending:
        clauses.append("redriven_at IS NULL")
    if filters.error_class is not None:
        args.append(filters.error_class)
        clauses.append(f"error_class = ${len(args)}")
    if filters.since is not None:
        args.append(filters.since)
        clauses.append(f"dead_lettered_at >= ${len(args)}")
    return " AND ".join(clauses), args


# -- list and show --------------------------------------------------------------------------


async def list_letters(config: Config, filters: Filters) -> list[str]:
    where, args = _where(config, filters, pending=False)
    conn = await _connect(config)
    try:
        rows = await conn.fetch(
            f"""SELECT id, src_topic, src_partition, src_offset, error_class, reason,
                       dead_lettered_at, attempts, redriven_at
                FROM dead_letters WHERE {where} ORDER BY id LIMIT {filters.limit or 50}""",
            *args,
        )
        total = await conn.fetchval(f"SELECT count(*) FROM dead_letters WHERE {where}", *args)
    finally:
        await conn.close()
    lines = [list_line(r) for r in rows]
    lines.append(f"{len(rows)} of {total} dead letter(s) of group {config.group_id}")
    return lines


async def show_letter(config: Config, letter_id: int) -> list[str] | None:
    """The letter's fields, or None when the group has no letter with that id."""
    conn = await _connect(config)
    try:
        r = await conn.fetchrow(
            "SELECT * FROM dead_letters WHERE id = $1 AND group_id = $2", letter_id, config.group_id
        )
    finally:
        await conn.close()
    return None if r is None else letter_lines(r, config.topic_prefix)


# -- redrive --------------------------------------------------------------------------------


@dataclass
class _Letter:
    id: int
    stream: str
    partition: int
    offset: int


async def replay(config: Config, filters: Filters, *, dry_run: bool) -> Outcome:
    """Redrive the group's pending dead letters that match ``filters``; see the module."""
    outcome = Outcome(dry_run=dry_run)
    writers = {name: TableWriter(DECODERS[name].tables) for name in DECODERS}
    conn = await _connect(config)
    try:
        batch_ids = iter(()) if dry_run else iter(await db.reserve_batch_ids(conn))
        after = 0  # letters are taken in id order; a letter that still fails is not retaken
        left = filters.limit
        while left is None or left > 0:
            chunk = CHUNK if left is None else min(CHUNK, left)
            batch_id = _DRY_RUN_BATCH_ID if dry_run else next(batch_ids, None)
            if batch_id is None:
                batch_ids = iter(await db.reserve_batch_ids(conn))
                batch_id = next(batch_ids)
            taken, after = await _redrive_chunk(
                conn, config, filters, writers, outcome, after=after, chunk=chunk,
                batch_id=batch_id, dry_run=dry_run,
            )  # fmt: skip
            if taken < chunk:
                break
            if left is not None:
                left -= taken
    except PipelineError:
        raise
    except Exception as exc:
        error = db.classify(exc)
        if isinstance(error, PipelineError):
            raise PipelineError(f"redriving dead letters: {error}") from exc
        raise
    finally:
        await conn.close()
    return outcome


async def _redrive_chunk(
    conn: Connection,
    config: Config,
    filters: Filters,
    writers: dict[str, TableWriter],
    outcome: Outcome,
    *,
    after: int,
    chunk: int,
    batch_id: int,
    dry_run: bool,
) -> tuple[int, int]:
    """One transaction: up to ``chunk`` pending letters with ids above ``after``. Returns how
    many were taken and the highest id taken."""
    where, args = _where(config, filters, pending=True)
    args.append(after)
    transaction = conn.transaction()  # committed, or rolled back in a dry run
    await transaction.start()
    try:
        await conn.execute(conn.prelude)  # as db.transaction does
        await db.lock_group_work(conn, config.group_id)
        letters = await conn.fetch(
            f"""SELECT id, src_topic, src_partition, src_offset, record_value, record_headers
                FROM dead_letters WHERE {where} AND id > ${len(args)}
                ORDER BY id LIMIT {chunk} FOR UPDATE SKIP LOCKED""",
            *args,
        )
        rows: dict[str, list[Row]] = defaultdict(list)
        owners: dict[str, list[_Letter]] = defaultdict(list)
        failed: dict[int, tuple[str, str]] = {}
        for r in letters:
            stream = stream_of(r["src_topic"], config.topic_prefix)
            assert stream is not None  # the WHERE clause takes only this prefix's data topics
            try:
                row = decode_again(
                    stream,
                    r["record_value"],
                    stored_headers(r["record_headers"]),
                    partition=r["src_partition"],
                    offset=r["src_offset"],
                    batch_id=batch_id,
                )
            except RecordRejected as exc:
                failed[r["id"]] = (exc.error_class, exc.reason)
                continue
            rows[stream].append(row)
            owners[stream].append(_Letter(r["id"], stream, r["src_partition"], r["src_offset"]))
        landed: list[int] = []
        # Into the group's own tables only (docs/exactly-once.md, "One group per table").
        await db.claim_tables(
            conn,
            config.group_id,
            db.stream_tables({s: config.topic(STREAM_BY_NAME[s].topic) for s in rows}),
        )
        for stream, stream_rows in rows.items():
            try:
                new, rejected = await db.write_bisecting(conn, writers[stream].write, stream_rows)
            except Exception as exc:
                error = db.classify(exc)
                if isinstance(error, (SchemaError, DataError)):
                    raise PipelineError(
                        f"writing the {stream} stream's redriven rows: {error}"
                    ) from exc
                raise
            refused = {r.index for r in rejected}
            for r in rejected:
                failed[owners[stream][r.index].id] = ("DatabaseRejected", r.reason)
            landed += [o.id for i, o in enumerate(owners[stream]) if i not in refused]
            outcome.new_rows += new
        await conn.execute(
            """UPDATE dead_letters SET redriven_at = now(), redriven_batch_id = $2,
                   attempts = attempts + 1, last_attempt_at = now()
               WHERE id = ANY($1::bigint[])""",
            landed,
            batch_id,
        )
        await conn.execute(
            """UPDATE dead_letters AS d SET error_class = f.error_class, reason = f.reason,
                   attempts = attempts + 1, last_attempt_at = now()
               FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, error_class, reason)
               WHERE d.id = f.id""",
            list(failed),
            [c for c, _ in failed.values()],
            [reason for _, reason in failed.values()],
        )
    except BaseException:
        await transaction.rollback()
        raise
    if dry_run:
        await transaction.rollback()
    else:
        await transaction.commit()
    outcome.redriven += len(landed)
    for error_class, reason in failed.values():
        outcome.fail(error_class, reason)
    return len(letters), max((r["id"] for r in letters), default=after)
