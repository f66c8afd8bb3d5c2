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


# -- maintenance planning --------------------------------------------------------------------

#: The bounds PostgreSQL writes ``MINVALUE`` and ``MAXVALUE`` for: an upgraded table's legacy
#: partition runs ``FROM (MINVALUE) TO (cut-over)``.
MINVALUE = datetime.datetime.min.replace(tzinfo=UTC)
MAXVALUE = datetime.datetime.max.replace(tzinfo=UTC)

#: An interval's length at most, in seconds: a month counts 31 days, so "two intervals
#: without maintenance" is never said too early.
INTERVAL_SECONDS = {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 31 * 86400}

_BOUND = re.compile(r"FOR VALUES FROM \((.+)\) TO \((.+)\)")


def overlaps(a: Range, b: Range) -> bool:
    return a.start < b.end and b.start < a.end


def parse_bound(text: str) -> Range | None:
    """A partition's bound as ``pg_get_expr(relpartbound, oid)`` writes it with the ISO
    DateStyle: ``FOR VALUES FROM ('2026-12-07 00:00:00+00') TO (...)`` (in another TimeZone
    with its offset, ``+01`` or ``+05:30``: the same moment), a date column's
    ``('2026-12-07')``, or ``MINVALUE``/``MAXVALUE``; None for ``DEFAULT``. ValueError for any
    other (a list or hash partition, a bound of several columns)."""
    if text.strip() == "DEFAULT":
        return None
    found = _BOUND.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not a range partition bound of one time column: {text!r}")
    return Range(_bound_value(found[1]), _bound_value(found[2]))


def _bound_value(text: str) -> datetime.datetime:
    if text == "MINVALUE":
        return MINVALUE
    if text == "MAXVALUE":
        return MAXVALUE
    if not (len(text) >= 2 and text[0] == text[-1] == "'"):
        raise ValueError(f"not a time bound: {text!r}")
    value = text[1:-1]
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a time bound: {text!r}") from None
    if moment.tzinfo is None:  # a date column's bound: midnight UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def bound_literal(moment: datetime.datetime, column_type: str) -> str:
    """``moment`` as a partition bound of a ``column_type`` column, in SQL: a quoted UTC time
    or date, or ``MINVALUE``/``MAXVALUE``."""
    if moment == MINVALUE:
        return "MINVALUE"
    if moment == MAXVALUE:
        return "MAXVALUE"
    t = moment.astimezone(UTC)
    if column_type == "date":
        return f"'{t.date().isoformat()}'"
    return f"'{t.isoformat(sep=' ')}'"


def show_range(range_: Range) -> str:
    """``[2026-12-07T00:00Z, 2026-12-08T00:00Z)``, ``MINVALUE`` and ``MAXVALUE`` by name."""

    def show(t: datetime.datetime) -> str:
        if t == MINVALUE:
            return "MINVALUE"
        if t == MAXVALUE:
            return "MAXVALUE"
        return t.strftime("%Y-%m-%dT%H:%MZ")

    return f"[{show(range_.start)}, {show(range_.end)})"


@dataclass(frozen=True)
class MaintenancePlan:
    """What one maintenance pass does to one table (:func:`plan_maintenance`)."""

    create: tuple[Range, ...] = ()  # new empty partitions, up to ``ahead``
    move: tuple[Range, ...] = ()  # ranges whose rows in DEFAULT get a partition of their own
    expire: tuple[Range, ...] = ()  # ranges whose rows in DEFAULT are older than the horizon
    drop: tuple[Range, ...] = ()  # existing partitions wholly older than the horizon
    # DEFAULT rows whose interval overlaps an existing partition only in part: no partition
    # of the interval can be made (an operator made those bounds; they are reported).
    blocked: tuple[Range, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.create or self.move or self.expire or self.drop or self.blocked)


def plan_maintenance(
    existing: list[Range] | tuple[Range, ...],
    in_default: list[Range] | tuple[Range, ...] | set[Range],
    now: datetime.datetime,
    partitioning: Partitioning,
) -> MaintenancePlan:
    """One pass over a table whose partitions (DEFAULT aside) cover ``existing``, and whose
    DEFAULT partition holds rows in the interval ranges ``in_default``.

    * create: the ranges :func:`wanted` at ``now`` that overlap no existing partition and
      whose rows are not in DEFAULT (those are moved);
    * move: the ranges of rows in DEFAULT, unless wholly older than the horizon (expire) or
      overlapping an existing partition (blocked: only a partition of another interval can
      overlap in part, and that is not made here);
    * drop: the existing partitions wholly older than the horizon (an upgraded table's legacy
      partition ``FROM (MINVALUE)`` too, once its end is). DEFAULT is never among them.
    """
    horizon = partitioning.horizon(now)
    held = sorted(set(in_default))
    expire = [r for r in held if expired(r, horizon)]
    blocked = [r for r in held if r not in expire and any(overlaps(r, e) for e in existing)]
    move = [r for r in held if r not in expire and r not in blocked]
    create = [
        r
        for r in wanted(now, partitioning.interval, partitioning.ahead)
        if not any(overlaps(r, e) for e in existing) and r not in move and not expired(r, horizon)
    ]
    drop = sorted(r for r in existing if expired(r, horizon))
    return MaintenancePlan(tuple(create), tuple(move), tuple(expire), tuple(drop), tuple(blocked))


def premade(
    existing: list[Range] | tuple[Range, ...], now: datetime.datetime, interval: str
) -> int:
    """How many partitions start at or after the end of ``now``'s interval: those made ahead."""
    after = step(floor(now, interval), interval)
    return sum(1 for r in existing if r.start >= after)


def newest_end(existing: list[Range] | tuple[Range, ...]) -> datetime.datetime | None:
    """The end of the newest partition (None when there is none, or it ends at MAXVALUE)."""
    ends = [r.end for r in existing if r.end != MAXVALUE]
    return max(ends) if ends else None


# -- writing into a partition directly --------------------------------------------------------
#
# An insert into a partitioned table finds each row's partition on its own; PostgreSQL 15 does
# that search for every row. A writer whose batch lies within one partition can name that
# partition instead and spare the search (docs/streams.md, "Partitions and retention").

Route = tuple[Range, str]  # a partition's range and its bare name


def direct_routes(
    found: list[tuple[str, Range | None]], now: datetime.datetime, interval: str
) -> tuple[Route, ...]:
    """The partitions a writer may name directly at ``now``: those of ``now``'s interval
    and after it. Retention drops only partitions wholly older than its horizon, which is
    before ``now``: so never one of these, and a writer never names a partition that a
    maintainer is about to drop. DEFAULT (range None) is never one."""
    current = floor(now, interval)
    return tuple(sorted((r, name) for name, r in found if r is not None and r.start >= current))


def route(routes: tuple[Route, ...], values: list[object]) -> str | None:
    """The name of the one partition of ``routes`` whose range holds every time in
    ``values`` (a batch's partition column), or None: the batch spans partitions, a time
    has none of ``routes``, or a value is not an aware datetime or a date (a NULL, say,
    which the insert through the parent refuses as it would anyway)."""
    if not routes or not values:
        return None
    try:
        low, high = _as_moment(min(values)), _as_moment(max(values))  # type: ignore[type-var]
    except (TypeError, ValueError):
        return None
    for range_, name in routes:
        if range_.start <= low and high < range_.end:
            return name
    return None


def _as_moment(value: object) -> datetime.datetime:
    """A partition column's value as a UTC moment: a date is its midnight UTC, as its
    partition's bounds are. TypeError for anything else, or a naive datetime."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise TypeError("a naive datetime")
        return value
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time(), UTC)
    raise TypeError(f"not a time: {type(value).__name__}")
