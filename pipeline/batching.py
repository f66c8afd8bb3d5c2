"""Batches and offset arithmetic; pure, ``now`` passed in.

A batch collects fetched records, decoded as they arrive, until it is full by records, by
bytes or by age. When it is
written, each partition's stored offset moves from where the database says it is
(``expected``) to one past the last record in the batch: the compare-and-set of
docs/exactly-once.md.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

Partition = tuple[str, int]  # (topic, partition)
Row = tuple[Any, ...]  # a COPY row: the table's columns in order, then its provenance


class FetchedRecord(Protocol):
    """What a batch needs of a consumed record (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def serialized_value_size(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def timestamp(self) -> int: ...


class Rejected(NamedTuple):
    """A record that cannot be ingested as it is, and why: a dead letter to be."""

    record: FetchedRecord
    error_class: str
    reason: str


@dataclass(frozen=True)
class Limits:
    max_records: int
    max_bytes: int
    max_wait_s: float


@dataclass
class Part:
    """One partition's records in a batch, in offset order, decoded when they arrived: a row
    for each record that decoded, in the same order, and the records that did not."""

    records: list[FetchedRecord]
    rows: list[Row]
    rejected: list[Rejected]

    def record_at(self, offset: int) -> FetchedRecord:
        records = self.records
        index = bisect.bisect_left(records, offset, key=_OFFSET)
        if index == len(records) or records[index].offset != offset:
            raise LookupError(f"no record at offset {offset} in this part")
        return records[index]

    def since(self, offset: int) -> Part:
        """The part from ``offset`` on (records before it were ingested already)."""
        records = self.records
        if records[0].offset >= offset:
            return self
        cut = bisect.bisect_left(records, offset, key=_OFFSET)
        rejected_before = sum(1 for r in self.rejected if r.record.offset < offset)
        return Part(
            records[cut:],
            self.rows[cut - rejected_before :],
            [r for r in self.rejected if r.record.offset >= offset],
        )


@dataclass
class Batch:
    """Records fetched for one ingest transaction, grouped by partition in offset order.

    ``batch_id`` is in every row: it is chosen before the first record is decoded."""

    batch_id: int = 0
    parts: dict[Partition, Part] = field(default_factory=dict)
    count: int = 0
    size: int = 0
    started_at: float | None = None

    def add(
        self,
        partition: Partition,
        records: Sequence[FetchedRecord],
        decoded: tuple[list[Row], list[Rejected]],
        now: float,
    ) -> None:
        """Add one fetch of a partition's records, with their rows and rejections."""
        if not records:
            return
        part = self.parts.get(partition)
        if part is not None and records[0].offset <= part.records[-1].offset:
            # The partition was sought back (a rebalance gave it straight back): what it
            # returns now replaces what it returned before, never adds to it.
            self.drop([partition])
            part = None
        if self.started_at is None:
            self.started_at = now
        rows, rejected = decoded
        if part is None:
            self.parts[partition] = Part(list(records), rows, rejected)
        else:
            part.records.extend(records)
            part.rows.extend(rows)
            part.rejected.extend(rejected)
        self.count += len(records)
        self.size += _size(records)

    def is_full(self, limits: Limits) -> bool:
        """At the record or byte limit: nothing more may be added."""
        return self.count >= limits.max_records or self.size >= limits.max_bytes

    def is_due(self, limits: Limits, now: float) -> bool:
        """Full, or as old as a batch may get before it is written."""
        return self.is_full(limits) or (
            self.started_at is not None and now - self.started_at >= limits.max_wait_s
        )

    def room(self, limits: Limits) -> int:
        """How many more records fit before the record limit."""
        return max(limits.max_records - self.count, 0)

    def drop(self, partitions: Iterable[Partition]) -> None:
        """Forget the records of these partitions (revoked, sought back, or stopped)."""
        for partition in list(partitions):
            part = self.parts.pop(partition, None)
            if part is not None:
                self.count -= len(part.records)
                self.size -= _size(part.records)
        if not self.count:
            self.started_at = None  # an empty batch has no age


def _size(records: Sequence[FetchedRecord]) -> int:
    # aiokafka reports -1 for a record without a value; it counts as nothing.
    sizes = list(map(_VALUE_SIZE, records))
    return int(sum(sizes)) + sizes.count(-1)


_OFFSET = operator.attrgetter("offset")
_VALUE_SIZE = operator.attrgetter("serialized_value_size")


@dataclass(frozen=True)
class OffsetMove:
    topic: str
    partition: int
    expected: int
    new: int


@dataclass(frozen=True)
class Plan:
    """What one batch writes: the parts past the stored offsets, and the offset moves."""

    batch_id: int
    parts: dict[Partition, Part]
    moves: list[OffsetMove]
    already_ingested: dict[str, int]  # per topic: redelivered records behind the stored offset


def plan(batch: Batch, positions: dict[Partition, int]) -> Plan:
    """Keep, per partition, the records at or past its stored offset.

    Records behind the stored offset were ingested already (a redelivery after a crash, or
    Kafka's committed offsets reset behind the database's); they are counted and skipped.
    Partitions without a known stored offset are left out entirely: they are not ours to
    write, or not yet positioned.
    """
    kept: dict[Partition, Part] = {}
    moves: list[OffsetMove] = []
    skipped: dict[str, int] = {}
    for partition, part in batch.parts.items():
        expected = positions.get(partition)
        if expected is None:
            continue
        fresh = part.since(expected)
        behind = len(part.records) - len(fresh.records)
        if behind:
            skipped[partition[0]] = skipped.get(partition[0], 0) + behind
        if not fresh.records:
            continue
        kept[partition] = fresh
        moves.append(OffsetMove(partition[0], partition[1], expected, fresh.records[-1].offset + 1))
    return Plan(batch.batch_id, kept, moves, skipped)


def lag(ends: dict[Partition, int], stored: dict[Partition, int]) -> int:
    """Records not yet ingested: end offsets minus stored offsets (0 where none is stored)."""
    return sum(max(end - stored.get(partition, 0), 0) for partition, end in ends.items())


def backoff(attempt: int, cap: float, base: float = 0.1) -> float:
    """Exponential backoff: 0.1 s, 0.2 s, 0.4 s ... up to ``cap``."""
    return float(min(cap, base * (2 ** min(attempt, 30))))
