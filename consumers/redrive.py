"""`pipeline dlq`: list, show and redrive dead letters (docs/repair.md).

A redrive decodes the group's pending dead letters again with today's decoders and writes
those that now pass through the agent's write path (:class:`consumers.writer.BatchWriter`),
a chunk of letters per transaction (:class:`_Chunk`); a dry run rolls each one back.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from consumers.writer import BatchWriter, Written, expired_because
from pipeline import db
from pipeline.batching import Row
from pipeline.config import Config
from pipeline.db import Connection
from pipeline.errors import ConfigError, DataError, PipelineError, SchemaError, TransientError
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
from pipeline.rows import RecordRejected

#: Letters per redrive transaction: bounds the locks held and the rows in memory.
CHUNK = 500
_DRY_RUN_BATCH_ID = 0  # a dry run rolls back: it reserves no batch id


async def _connect(config: Config) -> Connection:
    conn = await db.connect(config.database_url, config.db_session)
    try:
        await db.check_schema(conn)  # `pipeline migrate` changes it, not a redrive
        await db.check_catalog(conn, config.catalog, config.streams)
    except BaseException as exc:
        await conn.close()
        error = db.classify(exc)
        if isinstance(error, PipelineError) and error is not exc:
            raise PipelineError(f"checking the schema: {error}") from exc
        raise
    return conn


def _where(config: Config, filters: Filters, *, pending: bool) -> tuple[str, list[Any]]:
    """The WHERE clause of the filtered letters of the group, and its arguments ($1...)."""
    topics = list(stream_topics(config.catalog, config.topic_prefix, filters.stream))
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
    return None if r is None else letter_lines(r, config.catalog, config.topic_prefix)


# -- redrive --------------------------------------------------------------------------------


async def replay(config: Config, filters: Filters, *, dry_run: bool) -> Outcome:
    """Redrive the group's pending dead letters that match ``filters``; see the module."""
    outcome = Outcome(dry_run=dry_run)
    catalog = config.catalog
    writer = BatchWriter(config.group_id, stream_topics(catalog, config.topic_prefix), catalog)
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
            redrive = _Chunk(config, filters, after=after, size=chunk, batch_id=batch_id)
            try:
                await writer.write(
                    conn,
                    redrive.read,
                    # The lock a data rollback takes: it deletes rows and letters by source
                    # offset, so a redrive and a rollback never interleave.
                    lock=True,
                    after=redrive.mark,
                    savepoints=True,  # letters are suspect: no first attempt without them
                    commit=not dry_run,
                )
            except SchemaError as exc:
                if exc.stream is None:
                    raise
                raise PipelineError(
                    f"writing the {exc.stream} stream's redriven rows: {exc}"
                ) from exc
            redrive.count(outcome)
            if redrive.taken < chunk:
                break
            after = redrive.last
            if left is not None:
                left -= redrive.taken
    except (TransientError, DataError, SchemaError, ConfigError) as exc:  # a database's
        raise PipelineError(f"redriving dead letters: {exc}") from exc
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


class _Chunk:
    """One redrive transaction: up to ``size`` pending letters with ids above ``after``, read
    and decoded again (:meth:`read`), then marked (:meth:`mark`), as the writer calls them."""

    def __init__(
        self, config: Config, filters: Filters, *, after: int, size: int, batch_id: int
    ) -> None:
        self.config = config
        self.where, self.args = _where(config, filters, pending=True)
        self.args.append(after)
        self.size = size
        self.batch_id = batch_id
        self.taken = 0
        self.last = after  # the highest id taken
        self.owners: dict[str, list[int]] = {}  # per stream, the letter id of each row
        self.failed: dict[int, tuple[str, str]] = {}  # letter id -> (error class, reason)
        self.landed: list[int] = []
        self.expired: dict[str, int] = {}  # per stream: letters older than the horizon
        self.new_rows = 0

    async def read(self, conn: Connection) -> dict[str, list[Row]]:
        """The chunk's letters, locked: another redrive skips them, and once this one commits
        they are no longer pending, so no letter is ingested twice. Their rows carry the
        letter's source partition and offset, and the chunk's batch id."""
        letters = await conn.fetch(
            f"""SELECT id, src_topic, src_partition, src_offset, record_key, record_value,
                       record_headers, record_ts
                FROM dead_letters WHERE {self.where} AND id > ${len(self.args)}
                ORDER BY id LIMIT {self.size} FOR UPDATE SKIP LOCKED""",
            *self.args,
        )
        self.taken = len(letters)
        self.last = max((r["id"] for r in letters), default=self.last)
        rows: dict[str, list[Row]] = defaultdict(list)
        self.owners = defaultdict(list)
        self.failed = {}
        for r in letters:
            stream = stream_of(self.config.catalog, r["src_topic"], self.config.topic_prefix)
            assert stream is not None  # the WHERE clause takes only this prefix's data topics
            try:
                row = decode_again(
                    self.config.catalog[stream],
                    r["record_value"],
                    stored_headers(r["record_headers"]),
                    key=r["record_key"],
                    timestamp=r["record_ts"],
                    partition=r["src_partition"],
                    offset=r["src_offset"],
                    batch_id=self.batch_id,
                )
            except RecordRejected as exc:
                self.failed[r["id"]] = (exc.error_class, exc.reason)
                continue
            rows[stream].append(row)
            self.owners[stream].append(r["id"])
        # Into the group's own tables only (docs/exactly-once.md, "One group per table").
        config = self.config
        await db.claim_tables(
            conn,
            config.group_id,
            db.stream_tables(
                config.catalog, {s: config.topic(config.catalog[s].topic) for s in rows}
            ),
        )
        return rows

    async def mark(self, conn: Connection, written: Written) -> None:
        """The landed letters redriven; the others with their new error class and reason. A
        letter whose row is older than its stream's retention horizon is settled as redriven
        too: it is never written, as the agent commits past such a record."""
        self.landed = []
        self.expired = {s: len(gone) for s, gone in written.expired.items()}
        for stream, ids in self.owners.items():
            refused = {r.index: r for r in written.refused.get(stream, ())}
            for index, letter_id in enumerate(ids):
                if index in refused:
                    self.failed[letter_id] = ("DatabaseRejected", refused[index].reason)
                else:
                    self.landed.append(letter_id)
        self.new_rows = sum(written.new.values())
        await conn.execute(
            """UPDATE dead_letters SET redriven_at = now(), redriven_batch_id = $2,
                   attempts = attempts + 1, last_attempt_at = now()
               WHERE id = ANY($1::bigint[])""",
            self.landed,
            self.batch_id,
        )
        await conn.execute(
            """UPDATE dead_letters AS d SET error_class = f.error_class, reason = f.reason,
                   attempts = attempts + 1, last_attempt_at = now()
               FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, error_class, reason)
               WHERE d.id = f.id""",
            list(self.failed),
            [c for c, _ in self.failed.values()],
            [reason for _, reason in self.failed.values()],
        )

    def count(self, outcome: Outcome) -> None:
        expired = sum(self.expired.values())
        outcome.redriven += len(self.landed) - expired
        for stream, n in self.expired.items():
            outcome.expired[stream] += n
            outcome.horizon[stream] = expired_because(self.config.catalog[stream])
        outcome.new_rows += self.new_rows
        for error_class, reason in self.failed.values():
            outcome.fail(error_class, reason)
