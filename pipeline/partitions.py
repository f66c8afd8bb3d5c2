"""Time partitions of a stream's tables: their intervals, ranges, names and retention; pure.

A partitioned table is split by range of its stream's ``partition_by`` column into one
partition per interval, aligned on UTC boundaries (an hour, a day, a week from Monday, a
calendar month), plus a ``DEFAULT`` partition for whatever has no range yet. The
maintenance that creates and drops them (`pipeline partitions maintain`) and the agents that
count late records as expired both reckon with these functions. docs/streams.md,
"Partitions and retention", is the contract.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from pipeline.sql_names import derived

INTERVALS = ("hour", "day", "week", "month")
#: The column types a stream may be partitioned by.
PARTITION_TYPES = ("timestamptz", "date")
DEFAULT_AHEAD = 3
MAX_AHEAD = 1000

_UNITS = {"h": datetime.timedelta(hours=1), "d": datetime.timedelta(days=1)}
_UNITS["w"] = 7 * _UNITS["d"]
_RETENTION = re.compile(r"([1-9][0-9]{0,5})([hdw])")
UTC = datetime.UTC


@dataclass(frozen=True)
class Partitioning:
    """How a stream's row-per-record table is partitioned, and how long its rows are kept."""

    column: str
    interval: str = "day"  # one of INTERVALS
    ahead: int = DEFAULT_AHEAD  # future partitions that always exist, beside the current one
    retention: datetime.timedelta | None = None  # None: kept for ever

    def horizon(self, now: datetime.datetime) -> datetime.datetime | None:
        """The oldest time a row may have and still be kept (None: no retention)."""
        return None if self.retention is None else now - self.retention

    def declaration(self) -> dict[str, object]:
        return {
            "partition_by": self.column,
            "partition_interval": self.interval,
            "partitions_ahead": self.ahead,
            "retention": format_retention(self.retention),
        }


def parse_retention(text: str) -> datetime.timedelta | None:
    """``"90d"``, ``"36h"``, ``"2w"`` as a timedelta; ``"none"`` as None (kept for ever).
    ValueError says what is accepted."""
    if text.strip().lower() == "none":
        return None
    found = _RETENTION.fullmatch(text.strip())
    if found is None:
        raise ValueError(
            f"retention {text!r} must be a whole number of hours, days or weeks, "
            'such as "36h", "90d" or "2w" (or "none")'
        )
    return int(found[1]) * _UNITS[found[2]]


def format_retention(retention: datetime.timedelta | None) -> str:
    """The retention as the catalog writes it, in its largest whole unit; "none" for None."""
    if retention is None:
        return "none"
    for unit in ("w", "d", "h"):
        count, rest = divmod(retention, _UNITS[unit])
        if not rest:
            return f"{count}{unit}"
    raise ValueError(f"retention {retention} is not a whole number of hours")


def floor(moment: datetime.datetime, interval: str) -> datetime.datetime:
    """The start (UTC) of the interval that holds ``moment`` (an aware datetime)."""
    t = moment.astimezone(UTC)
    if interval == "hour":
        return t.replace(minute=0, second=0, microsecond=0)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return day
    if interval == "week":
        return day - datetime.timedelta(days=day.weekday())
    if interval == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown partition interval {interval!r}; choose from {INTERVALS}")


def step(start: datetime.datetime, interval: str, count: int = 1) -> datetime.datetime:
    """The start of the interval ``count`` intervals after the one starting at ``start``."""
    if interval == "hour":
        return start + count * datetime.timedelta(hours=1)
    if interval == "day":
        return start + count * datetime.timedelta(days=1)
    if interval == "week":
        return start + count * datetime.timedelta(days=7)
    if interval == "month":
        months = start.year * 12 + start.month - 1 + count
        return start.replace(year=months // 12, month=months % 12 + 1)
    raise ValueError(f"unknown partition interval {interval!r}; choose from {INTERVALS}")


@dataclass(frozen=True, order=True)
class Range:
    """One partition's range of times, ``[start, end)``, both UTC."""

    start: datetime.datetime
    end: datetime.datetime


def interval_range(moment: datetime.datetime, interval: str) -> Range:
    """The partition range that holds ``moment``."""
    start = floor(moment, interval)
    return Range(start, step(start, interval))


def wanted(now: datetime.datetime, interval: str, ahead: int) -> list[Range]:
    """The ranges that must exist at ``now``: the current interval's and ``ahead`` after it."""
    start = floor(now, interval)
    return [Range(step(start, interval, i), step(start, interval, i + 1)) for i in range(ahead + 1)]


def expired(range_: Range, horizon: datetime.datetime | None) -> bool:
    """Whether every time of ``range_`` is older than the retention horizon: the partition
    can be dropped whole."""
    return horizon is not None and range_.end <= horizon


def partition_name(table: str, range_: Range, interval: str) -> str:
    """The bare name of the partition of ``table`` (as the catalog writes it) for ``range_``,
    in the table's schema: ``performance_metrics_p20261207`` (``_p2026120714`` by the hour,
    ``_p202612`` by the month)."""
    stamp = {"hour": "%Y%m%d%H", "day": "%Y%m%d", "week": "%Y%m%d", "month": "%Y%m"}[interval]
    return derived(table.rpartition(".")[2], "p" + range_.start.strftime(stamp))


def default_name(table: str) -> str:
    """The bare name of ``table``'s ``DEFAULT`` partition, in the table's schema."""
    return derived(table.rpartition(".")[2], "default")
