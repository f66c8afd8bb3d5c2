"""Consumer lag per partition, in records and in seconds; pure, ``now`` passed in.
:class:`LagBook` keeps what one agent knows of it; consumers/lag_watch.py asks Kafka and sets
the gauges. docs/observability.md says what each lag gauge means.

Lag in records is the end offset minus the stored offset. Lag in seconds is the age of the
oldest record not yet written: now minus the Kafka timestamp of the record at the stored
offset (or, when that offset holds no record, a transaction marker or an aborted record, the
next one), never interpolated from rates. When nothing waits it is 0.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.batching import Batch, Partition


@dataclass(frozen=True)
class PartitionLag:
    stored: int  # the next offset to write
    end: int  # the end offset (last stable offset)
    records: int
    seconds: float | None  # None: the oldest record's timestamp is not known yet


def partition_lag(
    now: float, stored: int, end: int, oldest_ms: int | None, *, markers_only: bool = False
) -> PartitionLag:
    """A partition's lag at ``now`` (seconds since the epoch), given its stored and end
    offsets and the timestamp (ms) of the oldest record not yet written, if known.
    ``markers_only``: a lookup found no record between the two offsets, only transaction
    markers or aborted records, so nothing waits (0 s) though the offsets differ."""
    if end <= stored:
        return PartitionLag(stored, stored, 0, 0.0)
    if markers_only:
        return PartitionLag(stored, end, end - stored, 0.0)
    seconds = None if oldest_ms is None or oldest_ms < 0 else max(now - oldest_ms / 1000, 0.0)
    return PartitionLag(stored, end, end - stored, seconds)


def timestamp_in_hand(
    batches: Iterable[Batch | None], partition: Partition, offset: int
) -> int | None:
    """The timestamp (ms) of the record at exactly ``offset`` of ``partition``, if one of
    ``batches`` (fetched, not written yet) holds it. Only an exact match counts: the first
    record held past ``offset`` is not the oldest unwritten one when the batch was fetched
    from elsewhere (a partition sought back)."""
    for batch in batches:
        part = batch.parts.get(partition) if batch is not None else None
        if part is None:
            continue
        records = part.records
        index = bisect.bisect_left(records, offset, key=_OFFSET)
        if index < len(records) and records[index].offset == offset:
            return records[index].timestamp
    return None


class OldestRecords:
    """Timestamps of the records at stored offsets, found by a lookup: one per partition,
    for the offset it was looked up at (a stored offset that moved needs a new lookup)."""

    def __init__(self) -> None:
        self._found: dict[Partition, tuple[int, int | None]] = {}

    def get(self, partition: Partition, offset: int) -> tuple[bool, int | None]:
        """(known, timestamp ms): the timestamp is None when only markers wait there."""
        found = self._found.get(partition)
        if found is None or found[0] != offset:
            return False, None
        return True, found[1]

    def put(self, partition: Partition, offset: int, timestamp_ms: int | None) -> None:
        self._found[partition] = (offset, timestamp_ms)

    def forget(self, partitions: Iterable[Partition]) -> None:
        for partition in partitions:
            self._found.pop(partition, None)


class LagBook:
    """What one agent knows of its owned partitions' lag without asking Kafka: each one's lag
    as last measured, the newest end offset learnt, and the timestamps looked up at stored
    offsets (:class:`OldestRecords`)."""

    def __init__(self) -> None:
        self._lag: dict[Partition, PartitionLag] = {}
        self._ends: dict[Partition, int] = {}
        self._oldest = OldestRecords()

    @property
    def ends(self) -> Mapping[Partition, int]:
        return self._ends

    def note_end(self, partition: Partition, offset: int) -> int:
        """An end offset learnt (asked of Kafka, or seen in a fetch response): the newest one
        known stands, since a reply can be older than one seen since. Returns it."""
        known = self._ends.get(partition)
        if known is None or offset > known:
            self._ends[partition] = known = offset
        return known

    def needs_lookup(self, partition: Partition, stored: int, end: int | None) -> bool:
        """Whether the timestamp at ``stored`` is to be asked of Kafka: records wait there and
        no lookup at that offset is known. Records in hand are the caller's to rule out."""
        return end is not None and end > stored and not self._oldest.get(partition, stored)[0]

    def found(self, partition: Partition, stored: int, timestamp_ms: int | None) -> None:
        """A lookup's answer: the timestamp at ``stored``, None when only markers wait."""
        self._oldest.put(partition, stored, timestamp_ms)

    def measure(
        self, partition: Partition, stored: int, end: int, now: float, in_hand_ms: int | None
    ) -> PartitionLag:
        """The partition's lag at ``now``, remembered. ``in_hand_ms``: the timestamp of the
        record at ``stored`` when a fetched batch holds it, else a lookup's answer is used; when
        neither is known the last lag in seconds stands rather than a gap in the gauge."""
        oldest = in_hand_ms
        markers_only = False
        if end > stored and oldest is None:
            known, oldest = self._oldest.get(partition, stored)
            markers_only = known and oldest is None
        lag = partition_lag(now, stored, end, oldest, markers_only=markers_only)
        if lag.seconds is None:
            previous = self._lag.get(partition)
            lag = PartitionLag(stored, lag.end, lag.records, previous.seconds if previous else None)
        self._lag[partition] = lag
        return lag

    def measured(self) -> list[Partition]:
        return list(self._lag)

    def seconds_behind(self) -> float:
        """The most lag in seconds of the partitions measured (0 when none is known)."""
        return max((lag.seconds or 0.0 for lag in self._lag.values()), default=0.0)

    def forget(self, partitions: Iterable[Partition]) -> None:
        partitions = list(partitions)
        self._oldest.forget(partitions)
        for partition in partitions:
            self._lag.pop(partition, None)
            self._ends.pop(partition, None)


_OFFSET = operator.attrgetter("offset")
