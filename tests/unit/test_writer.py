"""consumers.writer without a server: the rows and dead letters a batch's parts give, the
dead letter of each refused row, and the bisection that finds the refused rows (on a stand-in
connection that refuses rows by value, as PostgreSQL would by SQLSTATE)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from consumers.writer import BatchWriter, Refused, write_bisecting
from pipeline.batching import Part, Rejected, Row
from pipeline.catalog import load as load_catalog
from pipeline.db import DeadLetter
from pipeline.errors import SchemaError
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
