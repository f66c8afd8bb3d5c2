"""The one write path: a batch's transaction, its COPYs, the rows the database refuses (found
by bisection in savepoints) and its dead letters. The DatabaseAgent, the replay and the
dead-letter redrive all write through :class:`BatchWriter`; what differs between them (the
offsets' compare-and-set, the range replaced, letters decoded again, queued work) is what
they pass to :meth:`BatchWriter.write`. Rows older than their stream's retention horizon are
not written (:func:`unexpired`; docs/streams.md, "Late records"). docs/exactly-once.md
describes the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import db
from pipeline.batching import OffsetMove, Part, Partition, Row
from pipeline.catalog import Catalog, StreamSpec
from pipeline.db import Connection, DeadLetter, TableWriter
from pipeline.errors import DataError, PipelineError, SchemaError
from pipeline.partitions import Partitioning, format_retention
from pipeline.retry import classify
from pipeline.rows import source_of

Rows = Mapping[str, Sequence[Row]]  # stream -> its rows
ReadRows = Callable[[Connection], Awaitable[Rows]]
Step = Callable[[Connection], Awaitable[None]]
Work = Callable[[Connection], Awaitable[Any]]
Publish = Callable[[list[DeadLetter]], Awaitable[None]]
Clock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Refused:
    """A row the database refused: its index in its stream's rows, and why."""

    index: int
    sqlstate: str
    reason: str


@dataclass
class Written:
    """What one committed (or, with ``commit=False``, rolled back) transaction wrote. Indexes
    (of :class:`Refused`, of ``expired``) are into the stream's ``rows``."""

    rows: Rows  # per stream, every row given: written, refused, or expired
    new: dict[str, int]  # per stream: rows new to their table (the rest found their key stored)
    refused: dict[str, list[Refused]]  # per stream with any: the rows the database refused
    letters: list[DeadLetter]  # every dead letter recorded: decode failures, then refusals
    results: list[tuple[Any, BaseException | None]]  # per queued work: its result or error
    written_at: float = 0.0  # time.monotonic() once the last statement before COMMIT was done
    # Per stream with any: the indexes of the rows older than the stream's retention horizon,
    # not written (:func:`unexpired`).
    expired: dict[str, list[int]] = field(default_factory=dict)


class BatchWriter:
    """Writes batches of rows for ``group`` into the tables of the streams of ``topics``
    (deployed topic -> stream name), streams of ``catalog``. ``publish``, when given, sends
    every batch's dead letters (to the DLQ topic) before they are recorded in
    ``dead_letters``. ``clock`` gives the time each attempt reckons retention horizons from."""

    def __init__(
        self,
        group: str,
        topics: Mapping[str, str],
        catalog: Catalog,
        *,
        publish: Publish | None = None,
        clock: Clock = _utc_now,
    ) -> None:
        self.group = group
        self._stream_of = dict(topics)
        self._topic_of = {stream: topic for topic, stream in topics.items()}
        self._tables = {stream: TableWriter(catalog[stream]) for stream in self._topic_of}
        retained = {stream: Retained.of(catalog[stream]) for stream in self._topic_of}
        self._retained = {s: r for s, r in retained.items() if r is not None}
        self._publish = publish
        self._clock = clock

    async def write(
        self,
        conn: Connection,
        batch: Mapping[Partition, Part] | ReadRows,
        *,
        lock: bool = False,
        moves: Sequence[OffsetMove] = (),
        before: Step | None = None,
        work: Sequence[Work] = (),
        after: Callable[[Connection, Written], Awaitable[None]] | None = None,
        savepoints: bool = False,
        commit: bool = True,
    ) -> Written:
        """Write ``batch`` in one transaction (:func:`pipeline.db.transaction`):

        1. with ``lock``, the group's work lock (:func:`pipeline.db.lock_group_work`);
        2. the compare-and-set of ``moves`` (:func:`pipeline.db.advance_offsets`), the fence:
           :class:`FencedError` when a stored offset moved on. It locks those offset rows
           until the transaction ends, so a zombie stops here, before it writes or publishes
           anything, and waits here while another member commits;
        3. ``before(conn)``, the caller's own statements;
        4. each stream's rows with its :class:`TableWriter`, but those older than the stream's
           retention horizon (reported in :attr:`Written.expired`: neither written nor dead
           letters). ``batch`` is the fetched partitions' parts (their records that did not
           decode become dead letters, and so do the records of refused rows), or a function
           that reads the rows inside the transaction (refused rows are then only reported,
           in :attr:`Written.refused`);
        5. the dead letters: ``publish``, then ``dead_letters``;
        6. each ``work`` in a savepoint of its own (:func:`run_in_savepoint`);
        7. ``after(conn, written)``; then COMMIT, or with ``commit=False`` ROLLBACK.

        The first attempt writes without savepoints, which cost round trips; when the
        database refuses a row, the transaction rolls back and is run again with every
        stream's write bisected in savepoints (from the start with ``savepoints``). So every
        step may run twice: each must depend on nothing outside the transaction. Each attempt
        reckons the horizons from its own ``clock()``, so what commits is one attempt's.

        A stream's table that rejects every write is a :class:`SchemaError` naming the
        stream; any other driver error is classified (:func:`pipeline.retry.classify`).
        """
        if isinstance(batch, Mapping):
            rows, letters = self._gather(batch)
            job = _Job(None, rows, letters, batch, lock, moves, before, work, after, commit)
        else:
            job = _Job(batch, {}, [], None, lock, moves, before, work, after, commit)
        if not savepoints:
            try:
                return await self._attempt(conn, job, bisect=False)
            except _RowRejected:
                pass
        return await self._attempt(conn, job, bisect=True)

    def _gather(self, parts: Mapping[Partition, Part]) -> tuple[Rows, list[DeadLetter]]:
        rows: dict[str, list[Row]] = defaultdict(list)
        letters: list[DeadLetter] = []
        for (topic, _), part in parts.items():
            rows[self._stream_of[topic]].extend(part.rows)
            letters.extend(db.dead_letter(*r) for r in part.rejected)
        return rows, letters

    async def _attempt(self, conn: Connection, job: _Job, *, bisect: bool) -> Written:
        new: dict[str, int] = {}
        refused: dict[str, list[Refused]] = {}
        expired: dict[str, list[int]] = {}
        now = self._clock() if self._retained else None
        try:
            async with db.transaction(conn, commit=job.commit):
                if job.lock:  # work of the group's instances runs one at a time: no deadlocks
                    await db.lock_group_work(conn, self.group)
                if job.moves:
                    await db.advance_offsets(
                        conn,
                        self.group,
                        [(m.topic, m.partition, m.expected, m.new) for m in job.moves],
                    )
                if job.before is not None:
                    await job.before(conn)
                rows = job.rows if job.read is None else await job.read(conn)
                for stream, stream_rows in rows.items():
                    retained = self._retained.get(stream)
                    kept, at = stream_rows, None
                    if retained is not None and now is not None:
                        kept, at, gone = unexpired(stream_rows, retained, now)
                        if gone:
                            expired[stream] = gone
                    if not kept:
                        new[stream] = 0
                        continue
                    writer = self._tables[stream]
                    try:
                        if bisect:
                            new[stream], refusals = await write_bisecting(conn, writer.write, kept)
                            if refusals:  # indexes into every row given, expired ones too
                                refused[stream] = (
                                    refusals
                                    if at is None
                                    else [
                                        dataclasses.replace(r, index=at[r.index]) for r in refusals
                                    ]
                                )
                        else:  # each stream's table is written once in this transaction
                            new[stream] = await writer.write(conn, kept, last=True)
                    except Exception as exc:
                        error = db.classify(exc)
                        if isinstance(error, SchemaError):  # this stream's table is broken
                            raise error.for_stream(stream) from exc
                        if isinstance(error, DataError) and not bisect:
                            raise _RowRejected(str(error)) from exc
                        raise error from exc
                letters = job.letters
                if refused and job.parts is not None:
                    letters = letters + self._refused_letters(job.parts, rows, refused)
                if letters:
                    if self._publish is not None:
                        await self._publish(letters)
                    await db.insert_dead_letters(conn, self.group, letters)
                written = Written(rows, new, refused, letters, [], expired=expired)
                for work in job.work:
                    written.results.append(await run_in_savepoint(conn, work))
                if job.work:  # an aborted transaction would COMMIT as a silent ROLLBACK
                    await conn.fetchval("SELECT 1")
                if job.after is not None:
                    await job.after(conn, written)
                written.written_at = time.monotonic()
        except (PipelineError, _RowRejected):
            raise
        except Exception as exc:
            raise classify(exc) from exc
        return written

    def _refused_letters(
        self, parts: Mapping[Partition, Part], rows: Rows, refused: dict[str, list[Refused]]
    ) -> list[DeadLetter]:
        """The ``DatabaseRejected`` dead letters of the records whose rows were refused."""
        letters = []
        for stream, refusals in refused.items():
            topic = self._topic_of[stream]
            for r in refusals:
                partition, offset = source_of(rows[stream][r.index])
                record = parts[(topic, partition)].record_at(offset)
                letters.append(db.dead_letter(record, "DatabaseRejected", r.reason))
        return letters


@dataclass(frozen=True)
class Retained:
    """A stream with a retention: where its partition column is in a row, and for how long
    its rows are kept."""

    index: int
    partitioning: Partitioning
    date: bool  # a date column: compared with the horizon's date

    @classmethod
    def of(cls, spec: StreamSpec) -> Retained | None:
        """None when the stream keeps its rows for ever: its rows are not looked at."""
        partitioning = spec.partitioning
        if partitioning is None or partitioning.retention is None:
            return None
        column = partitioning.column
        return cls(
            spec.column_names.index(column), partitioning, spec.column(column).type == "date"
        )

    @property
    def why(self) -> str:
        """What makes a row expired, in words: "its ts is older than now minus 1d"."""
        retention = format_retention(self.partitioning.retention)
        return f"its {self.partitioning.column} is older than now minus {retention}"

    def horizon(self, now: datetime.datetime) -> datetime.datetime | datetime.date:
        """The oldest value of the partition column that is still kept at ``now``."""
        horizon = self.partitioning.horizon(now)
        assert horizon is not None  # Retained.of takes only a stream with a retention
        return horizon.astimezone(datetime.UTC).date() if self.date else horizon


def unexpired(
    rows: Sequence[Row], retained: Retained, now: datetime.datetime
) -> tuple[Sequence[Row], list[int] | None, list[int]]:
    """The rows to write at ``now``: those whose partition column is not older than the
    stream's retention horizon (one at the horizon is kept). Returns (rows kept, the index in
    ``rows`` of each kept row or None when all are kept, the indexes of the expired rows). A
    tombstone's partition column is None: it is kept, and deletes as it would."""
    i, horizon = retained.index, retained.horizon(now)
    gone = [n for n, row in enumerate(rows) if row[i] is not None and row[i] < horizon]
    if not gone:
        return rows, None, []
    dropped = set(gone)
    at = [n for n in range(len(rows)) if n not in dropped]
    return [rows[n] for n in at], at, gone


def expired_because(spec: StreamSpec) -> str:
    """Why a row of ``spec``'s stream was expired, in words (:attr:`Retained.why`)."""
    retained = Retained.of(spec)
    return retained.why if retained is not None else "it keeps its rows for ever"


@dataclass(frozen=True)
class _Job:
    """One :meth:`BatchWriter.write`'s arguments, for each of its attempts."""

    read: ReadRows | None
    rows: Rows
    letters: list[DeadLetter]
    parts: Mapping[Partition, Part] | None
    lock: bool
    moves: Sequence[OffsetMove]
    before: Step | None
    work: Sequence[Work]
    after: Callable[[Connection, Written], Awaitable[None]] | None
    commit: bool


class _RowRejected(Exception):
    """The database refused a row of a batch written without savepoints: write it again,
    bisecting to find the row."""


async def write_bisecting(
    conn: Connection,
    write: Callable[[Connection, Sequence[Row]], Awaitable[int]],
    rows: Sequence[Row],
) -> tuple[int, list[Refused]]:
    """Write ``rows``; when the database refuses some, find them by bisection.

    Each attempt runs in a savepoint, so a refused half rolls back alone and the good rows
    of the batch stay written. A batch with k bad rows among n costs about k·log2(n)
    attempts, never one attempt per row. Returns (new rows, refused rows by index).
    """
    refused: list[Refused] = []
    new = await _write_range(conn, write=write, rows=rows, start=0, stop=len(rows), refused=refused)
    return new, refused


async def _write_range(
    conn: Connection,
    *,
    write: Callable[[Connection, Sequence[Row]], Awaitable[int]],
    rows: Sequence[Row],
    start: int,
    stop: int,
    refused: list[Refused],
) -> int:
    if start >= stop:
        return 0
    try:
        async with conn.transaction():  # a savepoint inside the batch transaction
            return await write(conn, rows[start:stop])
    except Exception as exc:
        error = db.classify(exc)
        if not isinstance(error, DataError):
            raise error from exc
        if stop - start == 1:
            refused.append(Refused(start, error.sqlstate, str(error)))
            return 0
    middle = (start + stop) // 2
    first = await _write_range(
        conn, write=write, rows=rows, start=start, stop=middle, refused=refused
    )
    return first + await _write_range(
        conn, write=write, rows=rows, start=middle, stop=stop, refused=refused
    )


async def run_in_savepoint(conn: Connection, work: Work) -> tuple[Any, BaseException | None]:
    """Run ``work(conn)`` in a savepoint of the batch's transaction: if it fails, only its own
    statements roll back, even when it caught a database error itself and left the
    transaction aborted. Only a connection that is gone (or a server that stopped answering)
    fails the whole batch, which is then retried with the work; any other failure is the
    work's own, and the same work would fail again."""
    await conn.execute("SAVEPOINT queued_work")
    try:
        result = await work(conn)
        await conn.execute("RELEASE SAVEPOINT queued_work")
    except Exception as exc:
        if _connection_lost(conn, exc):
            raise classify(exc) from exc
        await conn.execute("ROLLBACK TO SAVEPOINT queued_work")
        return None, exc
    return result, None


def _connection_lost(conn: Connection, exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return (
        conn.is_closed()
        or isinstance(exc, (OSError, TimeoutError))
        or sqlstate[:2] in ("08", "40", "53", "57", "58")
        or sqlstate in ("25P03", "25P04")  # the server ended an idle or overlong transaction
    )
