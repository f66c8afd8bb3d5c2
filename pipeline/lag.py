"""Consumer lag per partition, in records and in seconds; pure, ``now`` passed in.

Lag in records is the end offset minus the stored offset. Lag in seconds is the age of the
oldest record not yet written: now minus the Kafka timestamp of the record at the stored
offset (or, when that offset holds no record, a transaction marker or an aborted record, the
next one), never interpolated from rates. When nothing waits it is 0.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
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


_OFFSET = operator.attrgetter("offset")
