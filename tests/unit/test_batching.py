"""Batch limits, offset arithmetic (the compare-and-set moves) and backoff: pure, ``now`` given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from pipeline.batching import (
    Batch,
    Limits,
    OffsetMove,
    Part,
    Partition,
    Rejected,
    Row,
    backoff,
    plan,
)

A0: Partition = ("a", 0)
A1: Partition = ("a", 1)
B0: Partition = ("b", 0)
LIMITS = Limits(max_records=10, max_bytes=1000, max_wait_s=0.25)


@dataclass(frozen=True)
class Rec:
    """What aiokafka's ConsumerRecord offers a batch, and nothing more."""

    topic: str
    partition: int
    offset: int
    value: bytes | None = b"v"
    key: bytes | None = None
    serialized_value_size: int = 100
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = 0


def recs(partition: Partition, *offsets: int, size: int = 100) -> list[Rec]:
    return [Rec(partition[0], partition[1], o, serialized_value_size=size) for o in offsets]


def decoded(records: Sequence[Rec]) -> tuple[list[Row], list[Rejected]]:
    """Stand-in rows: a record decodes to ("row", offset); a record without value is rejected."""
    return (
        [("row", r.offset) for r in records if r.value is not None],
        [Rejected(r, "EmptyRecord", "no value") for r in records if r.value is None],
    )


def add(batch: Batch, partition: Partition, records: list[Rec], now: float) -> None:
    batch.add(partition, records, decoded(records), now)


def batch_of(*parts: tuple[Partition, list[Rec]], now: float = 0.0) -> Batch:
    batch = Batch()
    for partition, records in parts:
        add(batch, partition, records, now)
    return batch


def records_of(parts: dict[Partition, Part]) -> dict[Partition, list[Rec]]:
    return {partition: list(part.records) for partition, part in parts.items()}  # type: ignore[misc]


# -- Batch -----------------------------------------------------------------------------------


def test_new_batch_is_empty_and_not_full() -> None:
    batch = Batch()
    assert (batch.parts, batch.count, batch.size, batch.started_at) == ({}, 0, 0, None)
    assert not batch.is_full(LIMITS)
    assert not batch.is_due(LIMITS, now=1e9)


def test_add_groups_by_partition_in_arrival_order_and_counts() -> None:
    batch = Batch()
    add(batch, A0, recs(A0, 5, 6), now=10.0)
    add(batch, B0, recs(B0, 0, size=30), now=10.1)
    add(batch, A0, recs(A0, 7), now=10.2)
    assert records_of(batch.parts) == {A0: recs(A0, 5, 6, 7), B0: recs(B0, 0, size=30)}
    assert batch.parts[A0].rows == [("row", 5), ("row", 6), ("row", 7)]
    assert (batch.count, batch.size) == (4, 330)
    assert batch.started_at == 10.0  # the first record's arrival starts the clock


def test_adding_nothing_does_not_start_the_clock() -> None:
    batch = Batch()
    add(batch, A0, [], now=5.0)
    assert (batch.parts, batch.count, batch.size, batch.started_at) == ({}, 0, 0, None)


def test_a_record_without_value_counts_as_zero_bytes() -> None:
    # aiokafka reports serialized_value_size -1 for a tombstone.
    tombstone = Rec("a", 0, 1, value=None, serialized_value_size=-1)
    batch = batch_of((A0, [tombstone, *recs(A0, 2, size=40)]))
    assert (batch.count, batch.size) == (2, 40)
    assert batch.parts[A0].rejected == [Rejected(tombstone, "EmptyRecord", "no value")]
    batch.drop([A0])
    assert (batch.count, batch.size) == (0, 0)


@pytest.mark.parametrize(
    ("records", "size", "now", "full", "due"),
    [
        pytest.param(1, 100, 0.0, False, False, id="one-record"),
        pytest.param(9, 100, 0.0, False, False, id="one-below-record-limit"),
        pytest.param(10, 10, 0.0, True, True, id="at-record-limit"),
        pytest.param(12, 10, 0.0, True, True, id="past-record-limit"),
        pytest.param(2, 499, 0.0, False, False, id="below-byte-limit"),
        pytest.param(2, 500, 0.0, True, True, id="at-byte-limit"),
        pytest.param(1, 5000, 0.0, True, True, id="one-huge-record"),
        pytest.param(1, 1, 0.2499, False, False, id="younger-than-max-wait"),
        pytest.param(1, 1, 0.25, False, True, id="age-at-max-wait"),
        pytest.param(1, 1, 7.0, False, True, id="age-past-max-wait"),
    ],
)
def test_batch_is_full_by_records_or_bytes_and_due_by_those_or_age(
    records: int, size: int, now: float, full: bool, due: bool
) -> None:
    batch = batch_of((A0, recs(A0, *range(records), size=size)), now=0.0)
    assert batch.is_full(LIMITS) is full
    assert batch.is_due(LIMITS, now=now) is due


def test_age_counts_from_the_first_add_not_the_last() -> None:
    batch = Batch()
    add(batch, A0, recs(A0, 0, size=1), now=100.0)
    add(batch, A0, recs(A0, 1, size=1), now=100.2)
    assert batch.is_due(LIMITS, now=100.25)


@pytest.mark.parametrize(
    ("count", "room"),
    [
        pytest.param(0, 10, id="empty"),
        pytest.param(3, 7, id="partly-filled"),
        pytest.param(10, 0, id="full"),
        pytest.param(13, 0, id="overfull-never-negative"),
    ],
)
def test_room_is_what_fits_before_the_record_limit(count: int, room: int) -> None:
    batch = batch_of((A0, recs(A0, *range(count))))
    assert batch.room(LIMITS) == room


@pytest.mark.parametrize(
    ("dropped", "left", "count", "size"),
    [
        pytest.param([A0], {A1: recs(A1, 0), B0: recs(B0, 9, 10, size=7)}, 3, 114, id="one"),
        pytest.param([A0, B0], {A1: recs(A1, 0)}, 1, 100, id="two"),
        pytest.param([("c", 0)], None, 6, 414, id="not-in-batch"),
        pytest.param([], None, 6, 414, id="none"),
        pytest.param([A0, A1, B0], {}, 0, 0, id="all"),
    ],
)
def test_drop_forgets_the_partitions_and_their_counts(
    dropped: list[Partition], left: dict[Partition, list[Rec]] | None, count: int, size: int
) -> None:
    parts = {A0: recs(A0, 1, 2, 3), A1: recs(A1, 0), B0: recs(B0, 9, 10, size=7)}
    batch = batch_of(*parts.items())
    batch.drop(dropped)
    assert records_of(batch.parts) == (parts if left is None else left)
    assert (batch.count, batch.size) == (count, size)


# -- plan: records past the stored offsets, and the compare-and-set moves ---------------------

PLANS = [
    pytest.param(
        [(A0, recs(A0, 5, 6, 7))],
        {A0: 5},
        {A0: recs(A0, 5, 6, 7)},
        [OffsetMove("a", 0, 5, 8)],
        {},
        id="all-fresh",
    ),
    pytest.param(
        [(A0, recs(A0, 3, 4, 5, 6))],
        {A0: 5},
        {A0: recs(A0, 5, 6)},
        [OffsetMove("a", 0, 5, 7)],
        {"a": 2},
        id="some-behind-skipped-and-counted",
    ),
    pytest.param(
        [(A0, recs(A0, 1, 2)), (A1, recs(A1, 10, 11))],
        {A0: 3, A1: 10},
        {A1: recs(A1, 10, 11)},
        [OffsetMove("a", 1, 10, 12)],
        {"a": 2},
        id="all-behind-no-move",
    ),
    pytest.param(
        [(A0, recs(A0, 0, 1)), (B0, recs(B0, 0))],
        {B0: 0},
        {B0: recs(B0, 0)},
        [OffsetMove("b", 0, 0, 1)],
        {},
        id="unknown-position-left-out-uncounted",
    ),
    pytest.param(
        [(A0, recs(A0, 0, 1, 2)), (A1, recs(A1, 4, 5)), (B0, recs(B0, 7, 8))],
        {A0: 2, A1: 5, B0: 8},
        {A0: recs(A0, 2), A1: recs(A1, 5), B0: recs(B0, 8)},
        [OffsetMove("a", 0, 2, 3), OffsetMove("a", 1, 5, 6), OffsetMove("b", 0, 8, 9)],
        {"a": 3, "b": 1},
        id="skips-summed-per-topic",
    ),
    pytest.param(
        # Compaction or transaction markers leave gaps: the move still starts where the
        # database says and ends one past the last record.
        [(A0, recs(A0, 12, 15))],
        {A0: 10},
        {A0: recs(A0, 12, 15)},
        [OffsetMove("a", 0, 10, 16)],
        {},
        id="gap-after-stored-offset",
    ),
    pytest.param([], {A0: 4}, {}, [], {}, id="empty-batch"),
    pytest.param([(A0, recs(A0, 0))], {}, {}, [], {}, id="no-positions"),
]


@pytest.mark.parametrize(("parts", "positions", "records", "moves", "skipped"), PLANS)
def test_plan(
    parts: list[tuple[Partition, list[Rec]]],
    positions: dict[Partition, int],
    records: dict[Partition, list[Rec]],
    moves: list[OffsetMove],
    skipped: dict[str, int],
) -> None:
    result = plan(batch_of(*parts), positions)
    assert records_of(result.parts) == records
    assert {p: part.rows for p, part in result.parts.items()} == {
        p: [("row", r.offset) for r in rs] for p, rs in records.items()
    }
    assert result.moves == moves
    assert result.already_ingested == skipped


def test_plan_leaves_the_batch_as_it_was() -> None:
    batch = batch_of((A0, recs(A0, 1, 2, 3)))
    plan(batch, {A0: 3})
    assert (records_of(batch.parts), batch.count, batch.size) == ({A0: recs(A0, 1, 2, 3)}, 3, 300)
    assert batch.parts[A0].rows == [("row", 1), ("row", 2), ("row", 3)]


# -- backoff ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "cap", "base", "delay"),
    [
        pytest.param(0, 10.0, 0.1, 0.1, id="first"),
        pytest.param(1, 10.0, 0.1, 0.2, id="second"),
        pytest.param(2, 10.0, 0.1, 0.4, id="third"),
        pytest.param(3, 10.0, 0.1, 0.8, id="fourth"),
        pytest.param(6, 10.0, 0.1, 6.4, id="seventh"),
        pytest.param(7, 10.0, 0.1, 10.0, id="capped"),
        pytest.param(10_000, 10.0, 0.1, 10.0, id="huge-attempt-no-overflow"),
        pytest.param(2, 0.25, 0.1, 0.25, id="small-cap"),
        pytest.param(3, 60.0, 1.0, 8.0, id="other-base"),
    ],
)
def test_backoff_doubles_from_base_up_to_cap(
    attempt: int, cap: float, base: float, delay: float
) -> None:
    result = backoff(attempt, cap, base)
    assert type(result) is float
    assert result == delay


def test_backoff_default_base_is_a_tenth_of_a_second() -> None:
    assert [backoff(n, cap=1.0) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_partition_sought_back_replaces_its_records_in_the_batch() -> None:
    # A rebalance that hands a partition straight back re-seeks it to its stored offset: the
    # records it returns again must replace the old copies, never follow them.
    batch = Batch()
    add(batch, A0, recs(A0, 10, 11, 12), now=0.0)
    add(batch, A1, recs(A1, 5), now=0.0)
    add(batch, A0, recs(A0, 10, 11), now=1.0)
    assert [r.offset for r in batch.parts[A0].records] == [10, 11]
    assert batch.parts[A0].rows == [("row", 10), ("row", 11)]
    assert (batch.count, batch.size) == (3, 300)
    assert plan(batch, {A0: 10, A1: 5}).moves == [
        OffsetMove("a", 1, 5, 6),
        OffsetMove("a", 0, 10, 12),
    ]


# -- Part: trimming to the stored offset keeps rows and rejections in step --------------------


def test_trimming_a_part_drops_rows_and_rejections_before_the_offset() -> None:
    # Offsets 3..8; 4 and 7 did not decode.
    records = [
        Rec("a", 0, o, value=None if o in (4, 7) else b"v", serialized_value_size=-1)
        for o in range(3, 9)
    ]
    part = Part(list(records), *decoded(records))
    for offset, rows, rejected in [
        (3, [3, 5, 6, 8], [4, 7]),
        (4, [5, 6, 8], [4, 7]),
        (5, [5, 6, 8], [7]),
        (7, [8], [7]),
        (8, [8], []),
        (9, [], []),
    ]:
        trimmed = part.since(offset)
        assert [r.offset for r in trimmed.records] == list(range(offset, 9))
        assert trimmed.rows == [("row", o) for o in rows]
        assert [r.record.offset for r in trimmed.rejected] == rejected
    assert part.since(2) is part  # nothing to trim: no copy


def test_record_at_finds_the_record_of_an_offset() -> None:
    records = recs(A0, 10, 11, 15)
    part = Part(list(records), *decoded(records))
    assert part.record_at(15) is records[2]
    assert part.record_at(10) is records[0]
    for missing in (9, 12, 16):
        with pytest.raises(LookupError):
            part.record_at(missing)
