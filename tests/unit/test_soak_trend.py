"""The soak run's verdict on growth (tests/soak_trend.py) on synthetic series: half an hour
sampled every 10 s, judged after the first 5 minutes, as `make soak` judges them."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

from pipeline.metrics import Metrics
from tests.soak import MEASURES, Run, Settings, judge, passed
from tests.soak_trend import RULES, Point, Rule, judged_points, trend

EVERY = 10.0
MINUTES = 30
AFTER = 300.0
SETTLE = 120.0
TIMES = [i * EVERY for i in range(int(MINUTES * 60 / EVERY) + 1)]


def _series(value: object, pid: object = lambda t: 1) -> list[Point]:
    return [Point(t, pid(t), value(t)) for t in TIMES]  # type: ignore[operator]


def _judge(points: list[Point], measure: str = "rss_mib") -> bool:
    return trend(points, RULES[measure], after=AFTER, settle=SETTLE).grows


def test_flat_with_noise_passes() -> None:
    rng = random.Random(1)
    assert not _judge(_series(lambda t: 120 + rng.gauss(0, 4)))
    assert not _judge(_series(lambda t: 30 + rng.choice((-2, -1, 0, 1, 2))), "asyncio_tasks")


def test_a_steady_slope_fails() -> None:
    rng = random.Random(2)
    # 1 MiB a minute: 25 MiB over the judged 25 minutes, above 16 MiB and 10% of ~135 MiB.
    leak = _series(lambda t: 120 + t / 60 + rng.gauss(0, 4))
    verdict = trend(leak, RULES["rss_mib"], after=AFTER, settle=SETTLE)
    assert verdict.grows
    assert math.isclose(verdict.slope_per_min, 1.0, rel_tol=0.15)
    assert math.isclose(verdict.peak_rise, 12.5, abs_tol=5.0)  # a new peak all the way
    # One connection every five minutes, and one task a minute.
    assert _judge(_series(lambda t: 2 + t // 300), "db_connections")
    assert _judge(_series(lambda t: 30 + t // 60), "asyncio_tasks")


def test_a_sawtooth_like_a_garbage_collector_passes() -> None:
    # Climbs 40 MiB over 3 minutes, then drops back: big swings, no trend.
    assert not _judge(_series(lambda t: 100 + 40 * ((t % 180) / 180)))
    # Tasks that come and go with each batch and retry.
    assert not _judge(_series(lambda t: 25 + 10 * (int(t / 10) % 4 == 0)), "asyncio_tasks")


def test_a_high_water_mark_that_rises_with_the_first_faults_then_holds_passes() -> None:
    # Up 10 MiB with each of the first four faults (buffers filled deeper), level after.
    assert not _judge(_series(lambda t: 100 + 10 * min(4, max(0, (t - AFTER) // 120))))
    # One step up late in the run.
    assert not _judge(_series(lambda t: 120 + 30 * (t > 1500)))


def test_a_count_that_steps_up_and_stays_fails() -> None:
    # Ten tasks more after a fault at minute 20, never to end: a leak, though a single step.
    assert _judge(_series(lambda t: 30 + 10 * (t > 1200)), "asyncio_tasks")
    # Back down after the fault: no leak.
    assert not _judge(_series(lambda t: 30 + 10 * (1200 < t < 1260)), "asyncio_tasks")


def test_growth_during_the_warm_up_is_not_judged() -> None:
    # Fast growth for 5 minutes (caches, pools filling), flat after.
    assert not _judge(_series(lambda t: 60 + min(t, AFTER) / 5))


def test_a_restart_drop_is_neither_a_fall_nor_a_rise_and_a_leak_across_restarts_fails() -> None:
    rng = random.Random(3)

    def pid(t: float) -> int:  # killed and restarted at minutes 12 and 21
        return 1 if t < 720 else 2 if t < 1260 else 3

    # A restarted process starts lower and settles back to the same level: no trend.
    flat = _series(lambda t: 120 - 40 * math.exp(-(t - (0 if t < 720 else 720)) / 30), pid)
    assert not _judge(flat)
    # Leaking 1 MiB a minute in each process, every restart resetting it: still a leak.
    start = {1: 0.0, 2: 720.0, 3: 1260.0}
    leak = _series(lambda t: 100 + (t - start[pid(t)]) / 60 + rng.gauss(0, 2), pid)
    assert _judge(leak)


def test_a_restarted_segment_drops_its_own_settling_time() -> None:
    points = [Point(t, 1 if t < 600 else 2, 0.0) for t in TIMES]
    judged = judged_points(points, after=AFTER, settle=SETTLE)
    assert next(p.t for p in judged if p.pid == 1) == AFTER
    assert next(p.t for p in judged if p.pid == 2) == 600 + SETTLE


def test_too_few_samples_are_not_a_trend() -> None:
    verdict = trend(
        [Point(400, 1, 1.0), Point(410, 1, 9.0)], Rule(floor=1.0), after=AFTER, settle=0
    )
    assert (verdict.judged, verdict.grows) == (0, False)


async def test_the_agents_tasks_gauge_counts_the_loops_unfinished_tasks() -> None:
    metrics = Metrics()
    metrics.count_tasks(asyncio.get_running_loop())
    before = metrics.total("pipeline_asyncio_tasks")
    release = asyncio.Event()
    waiting = [asyncio.create_task(release.wait()) for _ in range(5)]
    await asyncio.sleep(0)
    assert metrics.total("pipeline_asyncio_tasks") == before + 5
    release.set()
    await asyncio.gather(*waiting)
    assert metrics.total("pipeline_asyncio_tasks") == before


def test_a_batch_caught_in_flight_is_not_growth_of_the_memory_in_use() -> None:
    rng = random.Random(4)

    # 440,000 blocks between batches; a sample now and then lands in a batch being decoded
    # (700,000 more), more often in the second half (a backlog after a fault).
    def blocks(t: float) -> float:
        in_flight = rng.random() < (0.1 if t < 1050 else 0.3)
        return 440_000 + rng.gauss(0, 5_000) + 700_000 * in_flight

    series = _series(blocks)
    assert not _judge(series, "allocated_blocks")
    # Every sample judged, the batches in flight read as growth: why the rule takes each
    # minute's lowest.
    assert trend(series, Rule(floor=20_000), after=AFTER, settle=SETTLE).grows


def test_memory_in_use_that_grows_fails_though_each_minute_has_a_batch_in_flight() -> None:
    rng = random.Random(5)
    # 5,000 objects a minute kept (125,000 over the 25 judged minutes, above the floor).
    leak = _series(lambda t: 440_000 + 5_000 * t / 60 + 700_000 * (rng.random() < 0.2))
    assert _judge(leak, "allocated_blocks")
    # Half a MiB a minute of buffers: 12.5 MiB, above the 8 MiB floor.
    assert _judge(_series(lambda t: 12 + t / 120 + rng.gauss(0, 0.3)), "malloc_in_use_mib")
    # Flat with noise: no leak.
    assert not _judge(_series(lambda t: 12 + rng.gauss(0, 0.3)), "malloc_in_use_mib")


def _run(rss: Callable[[float], float], blocks: Callable[[float], float]) -> Run:
    run = Run(Settings(), oracle={"holds": True})
    for t in TIMES:
        for agent in ("agent-0", "agent-1"):
            run.samples.append(
                {
                    "t": t,
                    "agent": agent,
                    "pid": 1,
                    "rss_mib": rss(t),
                    "allocated_blocks": blocks(t),
                    "malloc_in_use_mib": 12.5,
                    "open_fds": 17.0,
                    "asyncio_tasks": 31.0,
                    "db_connections": 1.0,
                }
            )
    run.trends = judge(run)
    return run


def test_memory_in_use_that_grows_fails_the_run_though_rss_holds() -> None:
    assert Settings().judged == MEASURES  # RSS among them
    assert passed(_run(lambda t: 160.0, lambda t: 440_000.0))
    # Objects kept, 5,000 a minute, while RSS stays within the allocator's arenas.
    leaking = _run(lambda t: 160.0, lambda t: 440_000 + 5_000 * t / 60)
    assert not leaking.trends["agent-0 rss_mib"]["grows"]
    assert leaking.trends["agent-0 allocated_blocks"]["grows"]
    assert not passed(leaking)


def test_the_agents_memory_gauges_count_what_it_holds_in_use() -> None:
    metrics = Metrics()
    blocks = metrics.total("pipeline_python_allocated_blocks")
    in_use = metrics.total("pipeline_malloc_in_use_bytes")
    held = [object() for _ in range(50_000)]
    buffers = [bytearray(16 * 1024) for _ in range(1_000)]  # too big for Python's own arenas
    assert metrics.total("pipeline_python_allocated_blocks") - blocks >= 51_000
    assert metrics.total("pipeline_malloc_in_use_bytes") - in_use >= 1_000 * 16 * 1024
    del held, buffers
    assert metrics.total("pipeline_python_allocated_blocks") - blocks < 1_000
    assert metrics.total("pipeline_malloc_in_use_bytes") - in_use < 1024 * 1024


# agent-1's RSS (MiB) every 10 s of the 30-minute soak of 2026-12-07 (never restarted): up
# with the first faults to a peak of 182.6 at minute 13, between 158 and 181 after that.
_RECORDED_RSS = (
    "69.3 69.3 69.4 69.6 69.6 69.7 172.0 173.9 178.6 140.6 132.6 128.7 125.7 146.1 140.2 "
    "138.2 138.2 124.3 124.3 122.3 120.3 119.3 119.3 119.3 121.0 165.3 155.4 153.4 153.4 "
    "150.4 148.4 148.4 148.4 148.4 148.4 148.4 140.5 147.6 146.6 145.6 145.6 145.6 145.6 "
    "163.5 159.5 154.6 154.6 154.6 154.6 167.7 167.7 166.7 165.7 165.7 165.7 180.7 174.7 "
    "172.6 172.6 171.7 166.7 166.7 166.7 166.7 166.7 166.7 163.7 158.7 158.7 158.7 158.7 "
    "158.7 158.7 158.7 158.7 158.7 158.7 158.7 175.1 182.6 182.6 176.6 175.6 174.6 170.6 "
    "170.6 170.6 170.6 170.6 170.6 170.6 167.6 167.6 167.6 167.6 166.7 161.7 159.7 159.7 "
    "159.7 159.7 159.7 159.7 168.7 166.7 166.7 165.7 165.7 164.7 161.7 161.7 161.7 161.7 "
    "160.7 159.7 173.7 166.7 165.7 164.7 164.7 168.7 166.7 166.7 166.7 166.7 166.7 162.7 "
    "162.7 162.7 161.7 161.7 161.7 160.7 160.7 160.7 160.7 160.7 160.7 160.7 160.4 160.1 "
    "160.1 160.1 159.8 159.9 175.7 174.6 173.6 172.6 172.6 172.6 178.6 177.6 176.6 176.6 "
    "176.6 176.6 180.5 177.5 176.5 176.5 176.5 175.5 175.5 175.5 174.5 174.5 173.5 172.5 "
    "172.5 172.5 171.5 171.5 171.5 171.5 171.5 171.5 171.5 171.5 "
)


def test_the_recorded_high_water_mark_whose_peak_held_passes() -> None:
    values = [float(v) for v in _RECORDED_RSS.split()]
    points = [Point(10.0 * (i + 1), 1, v) for i, v in enumerate(values)]
    verdict = trend(points, RULES["rss_mib"], after=AFTER, settle=SETTLE)
    # Both halves' fitted growth is above half the limit (a step up at minute 25 does it)...
    assert verdict.early > verdict.limit / 2 and verdict.late > verdict.limit / 2
    # ...but the peak of the second half stayed below the first half's: no leak.
    assert verdict.peak_rise == 0.0
    assert not verdict.grows


def test_a_leak_in_steps_sets_new_peaks_and_fails() -> None:
    # 6 MiB more every 3 minutes, never given back, with noise: a staircase, not a slope.
    rng = random.Random(4)
    verdict = trend(
        _series(lambda t: 120 + 6 * (t // 180) + rng.gauss(0, 2)),
        RULES["rss_mib"],
        after=AFTER,
        settle=SETTLE,
    )
    assert verdict.peak_rise > verdict.limit / 2
    assert verdict.grows
