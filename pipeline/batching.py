"""Batches and offset arithmetic; pure, ``now`` passed in.

A batch collects fetched records until it is full by records, by bytes or by age. When it is
written, each partition's stored offset moves from where the database says it is
(``expected``) to one past the last record in the batch: the compare-and-set of DESIGN.md
section 4.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Partition = tuple[str, int]  # (topic, partition)


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


@dataclass(frozen=True)
class Limits:
    max_records: int
    max_bytes: int
    max_wait_s: float


@dataclass
class Batch:
    """Records fetched for one ingest transaction, grouped by partition in offset order."""

    records: dict[Partition, list[FetchedRecord]] = field(default_factory=dict)
    count: int = 0
    size: int = 0
    started_at: float | None = None

    def add(self, partition: Partition, records: Sequence[FetchedRecord], now: float) -> None:
        if not records:
            return
        held = self.records.get(partition)
        if held and records[0].offset <= held[-1].offset:
            # The partition was sought back (a rebalance gave it straight back): what it
            # returns now replaces what it returned before, never adds to it.
            self.drop([partition])
        if self.started_at is None:
            self.started_at = now
        self.records.setdefault(partition, []).extend(records)
        self.count += len(records)
        self.size += sum(max(r.serialized_value_size, 0) for r in records)

    def is_full(self, limits: Limits, now: float) -> bool:
        return (
            self.count >= limits.max_records
            or self.size >= limits.max_bytes
            or (self.started_at is not None and now - self.started_at >= limits.max_wait_s)
        )

    def room(self, limits: Limits) -> int:
        """How many more records fit before the record limit."""
        return max(limits.max_records - self.count, 0)

    def drop(self, partitions: Iterable[Partition]) -> None:
        """Forget the records of these partitions (revoked, sought back, or stopped)."""
        for partition in partitions:
            records = self.records.pop(partition, [])
            self.count -= len(records)
            self.size -= sum(max(r.serialized_value_size, 0) for r in records)
        if not self.count:
            self.started_at = None  # an empty batch has no age


@dataclass(frozen=True)
class OffsetMove:
    topic: str
    partition: int
    expected: int
    new: int


@dataclass(frozen=True)
class Plan:
    """What one batch writes: the records past the stored offsets, and the offset moves."""

    records: dict[Partition, list[FetchedRecord]]
    moves: list[OffsetMove]
    already_ingested: dict[str, int]  # per topic: redelivered records behind the stored offset


def plan(batch: Batch, positions: dict[Partition, int]) -> Plan:
    """Keep, per partition, the records at or past its stored offset.

    Records behind the stored offset were ingested already (a redelivery after a crash, or
    Kafka's committed offsets reset behind the database's); they are counted and skipped.
    Partitions without a known stored offset are left out entirely: they are not ours to
    write, or not yet positioned.
    """
    kept: dict[Partition, list[FetchedRecord]] = {}
    moves: list[OffsetMove] = []
    skipped: dict[str, int] = {}
    for partition, records in batch.records.items():
        expected = positions.get(partition)
        if expected is None:
            continue
        fresh = [r for r in records if r.offset >= expected]
        if len(fresh) < len(records):
            skipped[partition[0]] = skipped.get(partition[0], 0) + len(records) - len(fresh)
        if not fresh:
            continue
        kept[partition] = fresh
        moves.append(OffsetMove(partition[0], partition[1], expected, fresh[-1].offset + 1))
    return Plan(kept, moves, skipped)


def lag(ends: dict[Partition, int], stored: dict[Partition, int]) -> int:
    """Records not yet ingested: end offsets minus stored offsets (0 where none is stored)."""
    return sum(max(end - stored.get(partition, 0), 0) for partition, end in ends.items())


def backoff(attempt: int, cap: float, base: float = 0.1) -> float:
    """Exponential backoff: 0.1 s, 0.2 s, 0.4 s ... up to ``cap``."""
    return float(min(cap, base * (2 ** min(attempt, 30))))
