"""The soak run's verdict on growth: pure functions over samples, no IO. The rule is stated in
docs/testing.md ("The soak run"); tests/unit/test_soak_trend.py holds it to that.

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
    """When a series counts as growing: its fitted growth over the judged span is above
    ``relative`` times its median level, and above ``floor`` (in the measure's unit)."""

    floor: float
    relative: float = 0.10


#: Per measure: the floors are a little above what a healthy agent's series wanders by in
#: half an hour under faults (a few MiB of allocator churn, a connection opened for a retry).
RULES: dict[str, Rule] = {
    "rss_mib": Rule(floor=16.0),
    "open_fds": Rule(floor=8.0),
    "asyncio_tasks": Rule(floor=8.0),
    "db_connections": Rule(floor=2.0),
}


@dataclass(frozen=True)
class Trend:
    judged: int  # samples judged
    slope_per_min: float  # the pooled within-segment least-squares slope, per minute
    growth: float  # slope times the judged span
    level: float  # median of the judged samples
    limit: float  # max(relative * level, floor)

    @property
    def grows(self) -> bool:
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


def trend(points: Sequence[Point], rule: Rule, *, after: float, settle: float) -> Trend:
    """The verdict on one series.

    The slope is fitted by least squares with an intercept per segment and one slope for all
    (so a restart's drop is not read as a fall, nor its new process's lower level as a
    rise), over :func:`judged_points`; segments with fewer than 3 judged samples are left
    out. The growth is that slope times the span the judged samples cover. A sawtooth (a
    garbage collector, a pool that grows and shrinks) has a slope near zero; a leak has a
    steady positive one.
    """
    judged = judged_points(points, after=after, settle=settle)
    segments: dict[int, list[Point]] = {}
    for p in judged:
        segments.setdefault(p.pid, []).append(p)
    covariance = variance = 0.0
    used: list[Point] = []
    for segment in segments.values():
        if len(segment) < 3:
            continue
        used += segment
        mean_t = statistics.fmean(p.t for p in segment)
        mean_v = statistics.fmean(p.value for p in segment)
        covariance += sum((p.t - mean_t) * (p.value - mean_v) for p in segment)
        variance += sum((p.t - mean_t) ** 2 for p in segment)
    if not used or variance == 0:
        return Trend(len(used), 0.0, 0.0, 0.0, rule.floor)
    slope = covariance / variance  # per second
    span = max(p.t for p in used) - min(p.t for p in used)
    level = statistics.median(p.value for p in used)
    return Trend(
        judged=len(used),
        slope_per_min=slope * 60,
        growth=slope * span,
        level=level,
        limit=max(rule.relative * abs(level), rule.floor),
    )
