"""Replaying a topic range into PostgreSQL, the pure part (no IO, ``now`` passed in): the
flags parsed, a request resolved into one frozen range per partition, the statements that
empty a range before it is written again, progress and pace. consumers/replay.py does the IO;
docs/replay.md explains it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pipeline import sql_names
from pipeline.catalog import Catalog, StreamSpec
from pipeline.errors import PipelineError

Partition = tuple[str, int]  # (topic, partition)


class ReplayError(PipelineError):
    """A replay that cannot run as asked: a bad range, an unknown stream or replay."""


# -- range replacement ------------------------------------------------------------------------


def range_deletes(spec: StreamSpec) -> list[str]:
    """The statements that empty a replayed range (``$1`` partition, ``$2``..``$3`` offsets)
    before it is written again: every table with a row per record (an append table, a
    history table). A "latest" table is not emptied: the writer's version or offset guard
    keeps an older record from replacing a newer row, and a tombstone deletes again. A
    partitioned table is emptied through its parent, by every partition's source index: the
    statement names no time, since a record replayed may decode to another one."""
    return [
        f"DELETE FROM {sql_names.table(table)} "
        'WHERE "src_partition" = $1 AND "src_offset" >= $2 AND "src_offset" < $3'
        for table in spec.row_per_record
    ]


# -- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Earliest:
    """The log's first offset (``--from earliest``)."""


@dataclass(frozen=True)
class Now:
    """The log's end when the replay starts (``--to now``)."""


@dataclass(frozen=True)
class AtOffset:
    offset: int


@dataclass(frozen=True)
class AtTime:
    at: datetime  # aware

    @property
    def millis(self) -> int:
        return int(self.at.timestamp() * 1000)


Position = Earliest | Now | AtOffset | AtTime

_OFFSET = re.compile(r"^\d+$")
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_position(text: str, *, side: Literal["from", "to"]) -> Position:
    """``--from earliest | OFFSET | TIME`` or ``--to OFFSET | TIME | now``.

    A time is RFC 3339 with an explicit offset (``2026-11-01T12:00:00Z``,
    ``...+02:00``); one without is refused, because which zone it meant is the most common
    mistake with offset resets."""
    text = text.strip()
    flag = f"--{side}"
    if text == "earliest":
        if side == "to":
            raise ReplayError("--to earliest: the end is an OFFSET, a TIME or now")
        return Earliest()
    if text == "now":
        if side == "from":
            raise ReplayError("--from now: the start is earliest, an OFFSET or a TIME")
        return Now()
    if _OFFSET.match(text):
        return AtOffset(int(text))
    if _DATE_ONLY.match(text):
        raise ReplayError(
            f"{flag} {text}: a date alone has no time zone; give a time with an explicit "
            f"offset, e.g. {text}T00:00:00Z or {text}T00:00:00+02:00"
        )
    try:
        at = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ReplayError(
            f"{flag} {text!r}: expected {'earliest' if side == 'from' else 'now'}, an offset "
            "(a whole number) or an RFC 3339 time with an offset (2026-11-01T12:00:00Z)"
        ) from None
    if at.tzinfo is None or at.utcoffset() is None:
        raise ReplayError(
            f"{flag} {text}: the time has no UTC offset, so which zone it means is a guess; "
            f"add one: {text}Z for UTC, or {text}+02:00"
        )
    return AtTime(at)


def parse_streams(values: Iterable[str], catalog: Catalog) -> tuple[str, ...]:
    """``--stream`` given several times and/or as comma lists: the streams of ``catalog``, in
    order, once."""
    streams = [s.strip() for value in values for s in value.split(",") if s.strip()]
    if not streams:
        raise ReplayError(f"no stream given: --stream {','.join(catalog.names)}")
    try:
        catalog.check_names(streams)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    return tuple(dict.fromkeys(streams))


def parse_partitions(text: str | None) -> tuple[int, ...] | None:
    """``--partitions 0,1``: the partition numbers, or None (every partition)."""
    if text is None:
        return None
    try:
        found = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise ReplayError(f"--partitions {text!r}: expected a comma list of numbers") from None
    if not found or found[0] < 0:
        raise ReplayError(f"--partitions {text!r}: expected partition numbers >= 0")
    return found


# -- resolving a request into ranges --------------------------------------------------------


@dataclass(frozen=True)
class PartitionLog:
    """What Kafka says of one partition when the replay starts."""

    start: int  # the log's first offset (retention deleted what is below)
    end: int  # the log's end offset: one past the last record
    from_time: int | None = None  # offsets_for_times at --from TIME: None = no record at/after
    to_time: int | None = None  # offsets_for_times at --to TIME


@dataclass(frozen=True)
class Range:
    """The records ``[start, end)`` of one partition that the replay writes."""

    topic: str
    partition: int
    start: int
    end: int
    requested_end: int  # before the clamp to live ingestion
    gap: tuple[int, int] | None = None  # offsets [a, b) retention deleted, skipped (--allow-gap)

    @property
    def size(self) -> int:
        return max(self.end - self.start, 0)

    @property
    def key(self) -> Partition:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class Resolved:
    ranges: list[Range]
    notes: list[str] = field(default_factory=list)  # gaps and clamps, said to the user

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)


def name(topic: str, partition: int) -> str:
    return f"{topic}[{partition}]"


def _gap_text(topic: str, partition: int, lost: tuple[int, int], log_start: int) -> str:
    return (
        f"{name(topic, partition)}: offsets {lost[0]}-{lost[1] - 1} were deleted by retention; "
        f"the log starts at {log_start}"
    )


def resolve(
    start: Position,
    end: Position,
    logs: Mapping[Partition, PartitionLog],
    live: Mapping[Partition, int],
    *,
    allow_gap: bool = False,
) -> Resolved:
    """One frozen range per partition, from the request, the logs and live ingestion.

    * the start: ``earliest`` is the log's first offset; an OFFSET as given; a TIME the
      first offset at or after it (the log's end when none is). A start below the log's
      first offset (or a time before the first record kept, when retention deleted some)
      names the records lost and is refused, unless ``allow_gap``: then it starts at the log's
      first offset and the gap is noted.
    * the end (exclusive): ``now`` is the log's end; an OFFSET as given (past the log's end
      is an error); a TIME the first offset at or after it (records before the time).
    * the clamp: never at or past the live group's stored offset (``live``), which belongs
      to live ingestion; a partition without one is not clamped (the replay claims it).
    * a start after its end is an error; so is nothing at all to replay.
    """
    ranges: list[Range] = []
    notes: list[str] = []
    errors: list[str] = []
    for (topic, partition), log in sorted(logs.items()):
        where = name(topic, partition)
        gap: tuple[int, int] | None = None
        match start:
            case Earliest():
                first = log.start
            case AtOffset(offset):
                first = offset
                if first < log.start:
                    gap = (first, log.start)
            case AtTime():
                first = log.end if log.from_time is None else log.from_time
                if first == log.start and log.start > 0:
                    gap = (0, log.start)  # records from before the first kept may be in range
            case _:
                raise ReplayError(f"--from {start}: not a start")
        match end:
            case Now():
                last = log.end
            case AtOffset(offset):
                last = offset
                if last > log.end:
                    errors.append(
                        f"{where}: --to {offset} is past the log's end {log.end} "
                        "(the end is exclusive: the last record is at end - 1)"
                    )
                    continue
            case AtTime():
                last = log.end if log.to_time is None else log.to_time
            case _:
                raise ReplayError(f"--to {end}: not an end")
        if gap is not None and gap[0] < min(last, gap[1]):
            lost = (gap[0], min(last, gap[1]))
            if not allow_gap:
                hint = (
                    " (records before the first one kept may be from after --from)"
                    if isinstance(start, AtTime)
                    else ""
                )
                errors.append(
                    _gap_text(topic, partition, lost, log.start)
                    + hint
                    + ": refused; --allow-gap replays what is left"
                )
                continue
            notes.append(_gap_text(topic, partition, lost, log.start) + ": skipped (--allow-gap)")
            first = max(first, log.start)
        else:
            gap = None
        if first > last:
            errors.append(f"{where}: the start {first} is after the end {last}")
            continue
        clamped = last
        stored = live.get((topic, partition))
        if stored is not None and stored < last:
            clamped = max(stored, first)
            notes.append(
                f"{where}: offsets {clamped}-{last - 1} belong to live ingestion (its stored "
                f"offset is {stored}): the replay ends at {clamped}"
            )
        ranges.append(Range(topic, partition, first, clamped, last, gap))
    if errors:
        raise ReplayError("; ".join(errors))
    resolved = Resolved(ranges, notes)
    if resolved.total == 0:
        raise ReplayError(
            "the range is empty: nothing to replay"
            + (" (" + "; ".join(notes) + ")" if notes else "")
        )
    return resolved


def select_partitions(
    topics: Mapping[str, Sequence[int]], partitions: tuple[int, ...] | None
) -> list[Partition]:
    """Every partition of ``topics`` (topic -> its partitions), or only those numbered."""
    found = [(t, p) for t, ps in topics.items() for p in sorted(ps)]
    if partitions is None:
        return found
    missing = [p for p in partitions if not any(p in ps for ps in topics.values())]
    if missing:
        raise ReplayError(
            f"--partitions: no partition {', '.join(map(str, missing))} in "
            + ", ".join(f"{t} (0-{max(ps)})" for t, ps in topics.items() if ps)
        )
    return [(t, p) for t, p in found if p in partitions]


# -- progress and pace ----------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    elapsed: float  # seconds since this run started
    done_at_start: int = 0  # done before this run (a resumed replay)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(self.done / self.total, 1.0)

    @property
    def rate(self) -> float:
        """Records per second in this run."""
        return (self.done - self.done_at_start) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def left_s(self) -> float | None:
        """Seconds left at this run's rate; None before there is a rate."""
        rate = self.rate
        return None if rate <= 0 else max(self.total - self.done, 0) / rate

    def line(self) -> str:
        left = self.left_s
        return (
            f"{self.done:,}/{self.total:,} records ({self.fraction:.0%}), "
            f"{self.rate:,.0f} rows/s, "
            + ("time left unknown" if left is None else f"{_duration(left)} left")
        )

    def bar(self, width: int = 30) -> str:
        filled = int(self.fraction * width)
        return f"[{'#' * filled}{'.' * (width - filled)}] " + self.line()


def _duration(left: float) -> str:
    seconds = round(left)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def pace(done: int, rate: float | None, elapsed: float) -> float:
    """Seconds to wait so that ``done`` records since the start took at least ``done / rate``
    seconds: the rate limiter (``--rate``; None or 0: no limit)."""
    if not rate or rate <= 0:
        return 0.0
    return max(done / rate - elapsed, 0.0)
