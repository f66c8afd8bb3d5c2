"""Gaps: records Kafka deleted (retention) before the group ingested them. Pure: what a gap
is, where one may hide in a fetched batch, PIPELINE_ON_GAP's policy, and the lines that name
gaps (the agent's log, `pipeline gaps list`, status and top).
docs/exactly-once.md, "A stored offset below the log start", says how the agent handles one.

A gap is only ever a stored offset below the partition's log start offset. A hole between
fetched offsets is not one: with ``read_committed``, aborted records and transaction markers
leave holes that lose nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pipeline.batching import Part, Partition

#: PIPELINE_ON_GAP: "record" records the gap and goes on from the log start; "stop" stops the
#: stream until it is activated again.
Policy = Literal["record", "stop"]
#: What the agent did, as ``ingest_gaps.action`` records it.
Action = Literal["skipped", "stopped", "resumed"]


@dataclass(frozen=True)
class Gap:
    """Offsets ``first`` .. ``end - 1`` of a partition are lost: the group's stored offset was
    ``first``, and the log starts at ``end``."""

    topic: str
    partition: int
    first: int
    end: int

    @property
    def key(self) -> Partition:
        return (self.topic, self.partition)

    @property
    def lost(self) -> int:
        return self.end - self.first

    def describe(self) -> str:
        return (
            f"{self.topic}[{self.partition}]: offsets {self.first}-{self.end - 1} "
            f"({self.lost} records) were deleted by retention before they were ingested; "
            f"the log starts at {self.end}"
        )


def find(stored: Mapping[Partition, int], starts: Mapping[Partition, int]) -> list[Gap]:
    """The gaps of the partitions in both maps: each stored next offset below its log start."""
    return [
        Gap(topic, partition, offset, starts[(topic, partition)])
        for (topic, partition), offset in sorted(stored.items())
        if (topic, partition) in starts and offset < starts[(topic, partition)]
    ]


def suspects(parts: Mapping[Partition, Part], stored: Mapping[Partition, int]) -> list[Partition]:
    """Partitions of a batch whose first record is past the stored offset: the consumer may
    have reset an out-of-range position to the log start. Only the log start offset can tell
    (a transaction marker or aborted records leave the same hole); :func:`find` decides."""
    return sorted(
        p
        for p, part in parts.items()
        if p in stored and part.records and part.records[0].offset > stored[p]
    )


def skipped_to(gaps: Iterable[Gap]) -> dict[Partition, int]:
    """The stored offsets once ``gaps`` are skipped: each at its log start."""
    return {gap.key: gap.end for gap in gaps}


@dataclass(frozen=True)
class RecordedGap:
    """One row of ``ingest_gaps``, as `pipeline gaps list` shows it."""

    id: int
    group: str
    topic: str
    partition: int
    first_offset: int
    end_offset: int
    action: str
    instance_id: str
    detected_at: datetime
    skipped_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None

    def line(self) -> str:
        lost = self.end_offset - self.first_offset
        done = {
            "skipped": "skipped",
            "resumed": "stream stopped, then activated: skipped",
            "stopped": "stream STOPPED: activate it to go on from the log start",
        }.get(self.action, self.action)
        seen = (
            f"acknowledged {_time(self.acknowledged_at)} by {self.acknowledged_by}"
            if self.acknowledged_at is not None
            else "NOT acknowledged"
        )
        return (
            f"#{self.id} {_time(self.detected_at)} {self.topic}[{self.partition}] offsets "
            f"{self.first_offset}-{self.end_offset - 1} ({lost} records lost), {done}, by "
            f"{self.instance_id or '-'}; {seen}"
        )


def unacknowledged_by_stream(
    found: Iterable[RecordedGap], stream_of: Mapping[str, str]
) -> dict[str, int]:
    """Records lost in unacknowledged gaps, per stream (``stream_of`` maps a deployed topic to
    its stream; a topic it does not know is shown by its own name)."""
    lost: dict[str, int] = {}
    for gap in found:
        if gap.acknowledged_at is None:
            stream = stream_of.get(gap.topic, gap.topic)
            lost[stream] = lost.get(stream, 0) + gap.end_offset - gap.first_offset
    return lost


def gaps_line(lost: Mapping[str, int] | str) -> str:
    """What `pipeline control status` and `pipeline top` say of the records lost in
    unacknowledged gaps (:func:`unacknowledged_by_stream`), or of why the database could not
    tell."""
    if isinstance(lost, str):
        return f"unacknowledged gaps: {lost}"
    if not lost:
        return "unacknowledged gaps: none"
    streams = ", ".join(f"{stream} ({n} records)" for stream, n in sorted(lost.items()))
    return (
        f"UNACKNOWLEDGED GAPS, records lost to retention: {streams}; see `pipeline gaps list`, "
        "then `pipeline gaps ack`"
    )


def _time(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


#: Why a stream stopped on a gap, as /readyz says it (no offsets or names there).
STOPPED_REASON = "RecordsLost"
