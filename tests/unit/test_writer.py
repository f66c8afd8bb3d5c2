"""consumers.writer without a server: the rows and dead letters a batch's parts give, the
dead letter of each refused row, and the bisection that finds the refused rows (on a stand-in
connection that refuses rows by value, as PostgreSQL would by SQLSTATE)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator, Sequence

import pytest

from consumers.writer import (
    BatchWriter,
    Refused,
    Retained,
    expired_because,
    unexpired,
    write_bisecting,
)
from pipeline.batching import Part, Rejected, Row
from pipeline.catalog import load as load_catalog
from pipeline.db import DeadLetter
from pipeline.errors import SchemaError
from pipeline.rows import Tombstone
from tests.unit.test_batching import Rec


def row(partition: int, offset: int, value: object = "ok") -> Row:
    """A row of the shape the decoders give: columns, then partition, offset, batch id."""
    return (value, partition, offset, 1)


TOPICS = {"p.agents.metrics": "metrics", "p.agents.events": "events"}


def test_a_batch_gives_its_streams_rows_and_the_dead_letters_of_what_did_not_decode() -> None:
    bad = Rec("p.agents.metrics", 1, 11, value=None)
    parts = {
        ("p.agents.metrics", 0): Part([Rec("p.agents.metrics", 0, 5)], [row(0, 5)], []),
        ("p.agents.metrics", 1): Part(
            [Rec("p.agents.metrics", 1, 10), bad],
            [row(1, 10)],
            [Rejected(bad, "EmptyRecord", "record has no value (a tombstone)")],
        ),
        ("p.agents.events", 0): Part([Rec("p.agents.events", 0, 7)], [row(0, 7)], []),
    }
    rows, letters = BatchWriter("g", TOPICS, load_catalog())._gather(parts)
    assert rows == {"metrics": [row(0, 5), row(1, 10)], "events": [row(0, 7)]}
    assert [(d.topic, d.partition, d.offset, d.error_class) for d in letters] == [
        ("p.agents.metrics", 1, 11, "EmptyRecord")
    ]
    assert parts[("p.agents.metrics", 0)].rows == [row(0, 5)]  # the batch's parts unchanged


def test_a_refused_row_becomes_the_dead_letter_of_its_own_record() -> None:
    records = [Rec("p.agents.events", 3, offset, key=b"k%d" % offset) for offset in (40, 42, 45)]
    parts = {("p.agents.events", 3): Part(records, [row(3, r.offset) for r in records], [])}
    rows = {"events": [row(3, 40), row(3, 42), row(3, 45)]}
    refused = {"events": [Refused(1, "23514", "23514 violates check constraint")]}
    letters = BatchWriter("g", TOPICS, load_catalog())._refused_letters(parts, rows, refused)
    assert letters == [
        DeadLetter(
            topic="p.agents.events",
            partition=3,
            offset=42,
            key=b"k42",
            value=b"v",
            headers=[],
            timestamp_ms=0,
            error_class="DatabaseRejected",
            reason="23514 violates check constraint",
        )
    ]


class CheckViolation(Exception):
    sqlstate = "23514"


class UndefinedColumn(Exception):
    sqlstate = "42703"


class Savepoints:
    """A connection whose writes refuse rows whose value is "bad", a savepoint at a time."""

    def __init__(self) -> None:
        self.attempts = 0
        self.kept: list[Row] = []

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        before = len(self.kept)
        try:
            yield
        except BaseException:
            del self.kept[before:]  # rolled back to the savepoint
            raise

    async def write(self, conn: object, rows: Sequence[Row]) -> int:
        self.attempts += 1
        self.kept.extend(rows)
        if any(r[0] == "bad" for r in rows):
            raise CheckViolation("new row violates check constraint")
        return len(rows)


@pytest.mark.parametrize(("size", "bad"), [(1, []), (1, [0]), (7, [3]), (64, [0, 31, 63])])
async def test_bisection_finds_each_refused_row_and_keeps_the_others(
    size: int, bad: list[int]
) -> None:
    conn = Savepoints()
    rows = [row(0, i, "bad" if i in bad else "ok") for i in range(size)]
    new, refused = await write_bisecting(conn, conn.write, rows)  # type: ignore[arg-type]
    assert [r.index for r in refused] == bad
    assert {r.sqlstate for r in refused} <= {"23514"}
    assert new == size - len(bad)
    assert conn.kept == [r for r in rows if r[0] == "ok"]
    if bad:  # about k·log2(n) attempts, never one per row
        assert conn.attempts <= 1 + 2 * len(bad) * max(size.bit_length(), 1)


async def test_bisection_stops_at_an_error_no_row_causes() -> None:
    conn = Savepoints()

    async def broken(c: object, rows: Sequence[Row]) -> int:
        raise UndefinedColumn('column "cpu" does not exist')

    with pytest.raises(SchemaError, match="42703"):
        await write_bisecting(conn, broken, [row(0, 0), row(0, 1)])  # type: ignore[arg-type]


# -- rows older than the retention horizon ---------------------------------------------------

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
HORIZON = NOW - DAY  # with PIPELINE_RETENTION_METRICS=1d
METRICS = load_catalog().with_retention({"metrics": "1d"})


def metric(offset: int, ts: object, value: str = "ok", partition: int = 0) -> Row:
    """A metrics row (agent_id, name, value, ts, labels, provenance); ``value`` goes in name."""
    return ("agent-1", value, 1.0, ts, b"{}", partition, offset, 1)


def test_a_row_exactly_at_the_horizon_is_kept_and_one_a_microsecond_older_expires() -> None:
    retained = Retained.of(METRICS["metrics"])
    assert retained is not None
    micro = datetime.timedelta(microseconds=1)
    rows = [
        metric(0, HORIZON),
        metric(1, HORIZON - micro),
        metric(2, NOW),
        metric(3, HORIZON + micro),
    ]
    kept, at, gone = unexpired(rows, retained, NOW)
    assert (kept, at, gone) == ([rows[0], rows[2], rows[3]], [0, 2, 3], [1])


def test_no_row_expired_gives_the_rows_themselves() -> None:
    retained = Retained.of(METRICS["metrics"])
    assert retained is not None
    rows = [metric(0, NOW), metric(1, HORIZON)]
    kept, at, gone = unexpired(rows, retained, NOW)
    assert kept is rows and at is None and gone == []


def test_a_stream_without_retention_is_not_looked_at() -> None:
    catalog = load_catalog()
    assert [Retained.of(spec) for spec in catalog] == [None] * len(catalog.streams)
    assert Retained.of(METRICS["events"]) is None  # another stream's retention is not its own

    def clock() -> datetime.datetime:
        raise AssertionError("no stream has a retention: the clock is never read")

    writer = BatchWriter("g", TOPICS, catalog, clock=clock)
    assert writer._retained == {}


def test_a_date_column_compares_with_the_horizons_date() -> None:
    spec = dataclasses.replace(
        METRICS["metrics"],
        columns=tuple(
            dataclasses.replace(c, type="date") if c.name == "ts" else c
            for c in METRICS["metrics"].columns
        ),
    )
    retained = Retained.of(spec)
    assert retained is not None and retained.date
    late_evening = datetime.datetime(2026, 12, 6, 23, 0, tzinfo=datetime.UTC)
    day = datetime.date(2026, 12, 6)  # the horizon's date: 2026-12-06 12:00 UTC
    rows = [metric(0, day), metric(1, day - DAY), metric(2, day + DAY)]
    assert unexpired(rows, retained, NOW)[2] == [1]
    # The horizon's date in UTC, whatever the zone of the clock's time.
    east = late_evening.astimezone(datetime.timezone(datetime.timedelta(hours=5)))
    assert retained.horizon(east + DAY) == day


def test_a_tombstone_has_no_time_and_is_kept() -> None:
    retained = Retained.of(METRICS["metrics"])
    assert retained is not None
    rows = [Tombstone(("k", None, None, None, None, 0, 0, 1)), metric(1, HORIZON - DAY)]
    assert unexpired(rows, retained, NOW)[2] == [1]


class Batches(Savepoints):
    """A connection for BatchWriter.write: transactions and savepoints roll ``kept`` back, the
    dead letters it records are kept in ``letters``."""

    def __init__(self) -> None:
        super().__init__()
        self.letters: list[tuple[object, ...]] = []

    async def executemany(self, statement: str, args: list[tuple[object, ...]]) -> None:
        assert statement.lstrip().startswith("INSERT INTO dead_letters")
        self.letters.extend(args)


async def test_refused_rows_among_expired_ones_dead_letter_their_own_records() -> None:
    """Offsets 0..5: 1 and 3 expired, 4 refused by the database. The dead letter is offset 4's
    record, the indexes say which rows of the batch each fate was, and only 0, 2, 5 are
    written."""
    old = HORIZON - datetime.timedelta(seconds=1)
    times = [NOW, old, NOW, old, NOW, HORIZON]
    records = [Rec("p.agents.metrics", 0, offset, key=b"k%d" % offset) for offset in range(6)]
    rows = [metric(o, ts, "bad" if o == 4 else "ok") for o, ts in enumerate(times)]
    parts = {("p.agents.metrics", 0): Part(records, rows, [])}
    conn = Batches()
    writer = BatchWriter("g", TOPICS, METRICS, clock=lambda: NOW)
    lasts: list[bool] = []

    async def write(c: object, batch: Sequence[Row], *, last: bool = False) -> int:
        conn.attempts += 1
        lasts.append(last)
        conn.kept.extend(batch)
        if any(r[1] == "bad" for r in batch):
            raise CheckViolation("new row violates check constraint")
        return len(batch)

    writer._tables["metrics"].write = write  # type: ignore[method-assign, assignment]
    written = await writer.write(conn, parts)  # type: ignore[arg-type]
    assert [r[-2] for r in conn.kept] == [0, 2, 5]
    assert written.expired == {"metrics": [1, 3]}
    assert [r.index for r in written.refused["metrics"]] == [4]
    assert written.rows["metrics"] == rows  # the indexes are into every row given
    assert written.new == {"metrics": 3}
    assert [(d.offset, d.error_class) for d in written.letters] == [(4, "DatabaseRejected")]
    assert [(a[3], a[8]) for a in conn.letters] == [(4, "DatabaseRejected")]
    # The first attempt writes the table once, its last write in the transaction; the
    # bisection writes it several times, each emptying its stage for the next.
    assert lasts[0] is True
    assert len(lasts) > 2 and not any(lasts[1:])


async def test_each_attempt_reckons_the_horizon_from_its_own_clock() -> None:
    """The first attempt (refused by the database) ran at NOW; the second an hour later, when
    a row on the edge has expired too: what commits is the second attempt's reckoning."""
    edge = HORIZON + datetime.timedelta(minutes=30)
    records = [Rec("p.agents.metrics", 0, offset) for offset in range(3)]
    rows = [metric(0, edge), metric(1, NOW, "bad"), metric(2, NOW)]
    parts = {("p.agents.metrics", 0): Part(records, rows, [])}
    conn = Batches()
    times = iter([NOW, NOW + datetime.timedelta(hours=1)])
    writer = BatchWriter("g", TOPICS, METRICS, clock=lambda: next(times))

    async def write(c: object, batch: Sequence[Row], *, last: bool = False) -> int:
        conn.kept.extend(batch)
        if any(r[1] == "bad" for r in batch):
            raise CheckViolation("new row violates check constraint")
        return len(batch)

    writer._tables["metrics"].write = write  # type: ignore[method-assign, assignment]
    written = await writer.write(conn, parts)  # type: ignore[arg-type]
    assert written.expired == {"metrics": [0]}
    assert [r.index for r in written.refused["metrics"]] == [1]
    assert [r[-2] for r in conn.kept] == [2]


def test_the_reason_for_expiry_names_the_column_and_the_retention() -> None:
    assert expired_because(METRICS["metrics"]) == "its ts is older than now minus 1d"
    weeks = load_catalog().with_retention({"events": "14d"})
    assert expired_because(weeks["events"]) == "its ts is older than now minus 2w"
