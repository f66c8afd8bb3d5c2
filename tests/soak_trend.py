"""The soak run's verdict on growth: pure functions over samples, no IO. The rule is stated in
docs/testing.md ("The soak run: `make soak`"); tests/unit/test_soak_trend.py holds it to
that.

A series is one agent slot's samples of one measure (RSS, open file descriptors, asyncio
tasks, database connections), each sample tagged with the pid that gave it: a slot whose
agent was killed and restarted has several segments, one per process.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    t: float  # seconds since the soak began
    pid: int  # the process that gave the value: a new pid starts a new segment
    value: float


@dataclass(frozen=True)
class Rule:
    """The limit a series' growth is held to: ``relative`` times its median level, or
    ``floor`` (in the measure's unit) when that is higher. With ``steady``, only growth in
    both halves of the span counts (:attr:`Trend.grows`). With ``window_s``, each process's
    samples are cut into windows that long and only each window's lowest counts: the level
    the measure comes back to between batches, not a batch caught in flight."""

    floor: float
    relative: float = 0.10
    steady: bool = False
    window_s: float = 0.0  # judge each window's lowest sample alone (0: every sample)


#: Per measure: the floors are a little above what a healthy agent's series wanders by in
#: half an hour under faults (a few MiB of allocator churn, a connection opened for a retry,
#: a batch being decoded). RSS must grow steadily: CPython's allocator keeps the arenas of the
#: deepest buffering so far (a silent database, added latency) while a few objects made then
#: live on, a high-water mark that rises with the first faults and then holds or falls. What
#: the process holds in use (Python's allocated blocks, malloc's bytes in use) and the counts
#: (tasks, descriptors, connections) have no such excuse: a healthy agent comes back to them
#: after each fault, so any growth over the span counts; the memory measures are judged on
#: each minute's lowest sample, between batches.
RULES: dict[str, Rule] = {
    "rss_mib": Rule(floor=16.0, steady=True),
    # Under a backlog every sample of a minute may hold a small batch in flight, tens of
    # thousands of blocks: the floor is above a few of them.
    "allocated_blocks": Rule(floor=100_000.0, window_s=60.0),
    "malloc_in_use_mib": Rule(floor=8.0, window_s=60.0),
    "open_fds": Rule(floor=8.0),
    "asyncio_tasks": Rule(floor=8.0),
    "db_connections": Rule(floor=2.0),
}


@dataclass(frozen=True)
class Trend:
    judged: int  # samples judged
    slope_per_min: float  # the pooled within-segment least-squares slope, per minute
    growth: float  # that slope times the judged span
    early: float  # the same fitted on the first half of the span alone, times half the span
    late: float  # and on the second half
    level: float  # median of the judged samples
    limit: float  # max(relative * level, floor)
    steady: bool = False  # the rule's
    peak_rise: float = 0.0  # how far each process's peak rose in the second half, summed

    @property
    def grows(self) -> bool:
        """The growth over the span is above the limit; with ``steady``, each half's is above
        half the limit instead, and the peak rose by more than half the limit in the second
        half, so that a high-water mark that rises with the first faults and then holds, or
        a single step, does not count: a leak keeps setting new peaks."""
        if self.steady:
            half = self.limit / 2
            return self.early > half and self.late > half and self.peak_rise > half
        return self.growth > self.limit


def judged_points(points: Sequence[Point], *, after: float, settle: float) -> list[Point]:
    """The samples the verdict looks at: from ``after`` seconds on (the warm-up left out),
    and, in a segment that began later (a restarted process), from ``settle`` seconds after
    its first sample on (its own warm-up)."""
    if not points:
        return []
    starts: dict[int, float] = {}
    for p in points:
        starts.setdefault(p.pid, p.t)
    starts[points[0].pid] = after - settle  # the first process: the warm-up is its settling
    return [p for p in points if p.t >= max(after, starts[p.pid] + settle)]


def window_lows(points: Sequence[Point], window_s: float) -> list[Point]:
    """Each process's lowest sample of each ``window_s`` seconds, windows counted from that
    process's first sample here; what is left after its last whole window joins that one
    (a window of one sample would be a batch in flight as often as not)."""
    spans: dict[int, tuple[float, float]] = {}
    for p in points:
        first, _ = spans.get(p.pid, (p.t, p.t))
        spans[p.pid] = (first, p.t)
    lows: dict[tuple[int, int], Point] = {}
    for p in points:
        first, last = spans[p.pid]
        whole = max(1, int((last - first) // window_s))
        key = (p.pid, min(int((p.t - first) // window_s), whole - 1))
        if key not in lows or p.value < lows[key].value:
            lows[key] = p
    return sorted(lows.values(), key=lambda p: p.t)


def _slope(points: Sequence[Point]) -> tuple[float, int]:
    """The least-squares slope per second with an intercept per segment (pid) and one slope
    for all, so a restart's drop is not read as a fall, nor its new process's lower level as
    a rise; segments with fewer than 3 points are left out. Also the points used."""
    segments: dict[int, list[Point]] = {}
    for p in points:
        segments.setdefault(p.pid, []).append(p)
    covariance = variance = 0.0
    used = 0
    for segment in segments.values():
        if len(segment) < 3:
            continue
        used += len(segment)
        mean_t = statistics.fmean(p.t for p in segment)
        mean_v = statistics.fmean(p.value for p in segment)
        covariance += sum((p.t - mean_t) * (p.value - mean_v) for p in segment)
        variance += sum((p.t - mean_t) ** 2 for p in segment)
    return (covariance / variance if variance else 0.0), used


def peak_rise(points: Sequence[Point], middle: float) -> float:
    """How far each process's peak rose after ``middle`` above its peak before it (or above
    its first sample after it, for a process that began later), summed over the processes:
    a high-water mark that holds rises by nothing, a leak by its rate times the time."""
    segments: dict[int, list[Point]] = {}
    for p in points:
        segments.setdefault(p.pid, []).append(p)
    rise = 0.0
    for segment in segments.values():
        before = [p.value for p in segment if p.t < middle]
        after = [p.value for p in segment if p.t >= middle]
        if after:
            rise += max(0.0, max(after) - max(before or after[:1]))
    return rise


def trend(points: Sequence[Point], rule: Rule, *, after: float, settle: float) -> Trend:
    """The verdict on one series, over :func:`judged_points`: the fitted slope (see
    :func:`_slope`) over the whole judged span, and over each half of it. A sawtooth (a
    garbage collector, a pool that grows and shrinks) has slopes near zero; a leak has a
    steady positive one, in both halves."""
    judged = judged_points(points, after=after, settle=settle)
    if rule.window_s:
        judged = window_lows(judged, rule.window_s)
    slope, used = _slope(judged)
    if not used:
        return Trend(0, 0.0, 0.0, 0.0, 0.0, 0.0, rule.floor, rule.steady)
    first, last = min(p.t for p in judged), max(p.t for p in judged)
    middle, span = (first + last) / 2, last - first
    early, _ = _slope([p for p in judged if p.t <= middle])
    late, _ = _slope([p for p in judged if p.t >= middle])
    level = statistics.median(p.value for p in judged)
    return Trend(
        judged=used,
        slope_per_min=slope * 60,
        growth=slope * span,
        early=early * span / 2,
        late=late * span / 2,
        level=level,
        limit=max(rule.relative * abs(level), rule.floor),
        steady=rule.steady,
        peak_rise=peak_rise(judged, middle),
    )
