"""`pipeline bench --sdk`'s pure parts: the simulated agent's records and schedule, the
statistics of a way's report, the SDK against the old way, the table and the JSON; and the
simulated agent process's protocol, run with no server (the way that hands records to no one)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime

import pytest

from consumers.bench_sdk import (
    BATCHED,
    NOTHING,
    OLD,
    SDK,
    WAYS,
    AgentReport,
    AgentSpec,
    SdkPlan,
    WayResult,
    agent_records,
    cpu_at,
    net_of_own,
    next_tick,
    per_tick,
    percentile,
    ratios,
    sdk_json,
    sdk_table,
    summarise,
)
from pipeline.records import AgentEvent, Metric, StateChange, stream_of

AT = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)
PLAN = SdkPlan(rate=100, seconds=40, lock_at=15, lock_seconds=10)


def test_the_simulated_agent_emits_seven_metrics_two_events_and_a_state_in_every_ten() -> None:
    records = list(itertools.islice(agent_records(seed=1, now=lambda: AT), 1_000))
    assert Counter(map(stream_of, records)) == {"metrics": 700, "events": 200, "states": 100}
    assert [stream_of(r) for r in records[:10]] == ["metrics"] * 7 + ["events"] * 2 + ["states"]
    assert len({r.event_id for r in records if isinstance(r, AgentEvent)}) == 200
    assert all(isinstance(r, Metric | AgentEvent | StateChange) for r in records)


def test_the_simulated_agents_records_are_the_same_for_the_same_seed() -> None:
    first = list(itertools.islice(agent_records(seed=1, now=lambda: AT), 500))
    assert first == list(itertools.islice(agent_records(seed=1, now=lambda: AT), 500))
    assert first != list(itertools.islice(agent_records(seed=2, now=lambda: AT), 500))


def test_each_agents_state_versions_count_up_from_one() -> None:
    states = [
        r
        for r in itertools.islice(agent_records(seed=1, now=lambda: AT), 5_000)
        if isinstance(r, StateChange)
    ]
    by_agent: dict[str, list[int]] = {}
    for state in states:
        by_agent.setdefault(state.agent_id, []).append(state.version)
    assert all(v == list(range(1, len(v) + 1)) for v in by_agent.values())
    assert sum(map(len, by_agent.values())) == 500


@pytest.mark.parametrize(
    ("rate", "tick", "each"), [(100, 0.05, 5), (200, 0.05, 10), (1, 0.05, 1), (30, 0.05, 2)]
)
def test_each_tick_emits_the_rates_share(rate: float, tick: float, each: int) -> None:
    assert per_tick(rate, tick) == each


@pytest.mark.parametrize(
    ("now", "due"), [(0.0, 1), (0.01, 1), (0.049, 1), (0.05, 2), (0.26, 6), (10.3, 207)]
)
def test_an_agent_held_up_skips_the_ticks_it_missed(now: float, due: int) -> None:
    assert next_tick(0.0, now, 0.05) == due


def test_a_lock_that_outlasts_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the lock \(10 s from 15 s\) must end within the run"):
        SdkPlan(rate=100, seconds=20, lock_at=15, lock_seconds=10)


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([float(n) for n in range(1, 101)], 99, 99.0),
        ([float(n) for n in range(1, 101)], 50, 51.0),
        ([5.0], 99, 5.0),
    ],
)
def test_percentile_is_the_nearest_rank(
    values: list[float], percent: float, expected: float
) -> None:
    assert percentile(values, percent) == expected


def test_the_percentile_of_nothing_is_not_a_number() -> None:
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize(
    ("when", "spent"),
    [(99.0, 0.0), (100.0, 0.0), (101.0, 0.5), (102.0, 1.0), (103.5, 1.75), (120.0, 2.0)],
)
def test_cpu_at_interpolates_between_the_samples(when: float, spent: float) -> None:
    samples = [(100.0, 0.0), (102.0, 1.0), (104.0, 2.0)]
    assert cpu_at(samples, when) == pytest.approx(spent)


def _report(way: str = OLD) -> AgentReport:
    before = [(100 + 0.1 * i, 100 + 0.1 * i + 0.002) for i in range(8)]  # 2 ms each
    return AgentReport(
        way=way,
        emitted={"metrics": 7, "events": 2, "states": 1},
        scheduled=20,
        started=100.0,
        ended=110.0,
        cpu_s=0.005,
        peak_rss_mb=0.0,
        cpu=[(100.0, 0.0), (102.0, 0.001), (104.0, 0.0012), (106.0, 0.0014), (110.0, 0.005)],
        # Eight calls before the lock, one held through it, one after.
        calls=[*before, (101.9, 106.05), (106.1, 106.101)],
        lags=[(101.0, 0.001), (103.0, 0.012), (107.0, 0.002)],
    )


def test_a_report_is_summarised_against_the_lock() -> None:
    found = summarise(_report(), (102.0, 106.0), rate=100)
    assert math.isnan(found.cpu_ms_per_1k_net)  # net_of_own sets it, once NOTHING is known
    assert asdict(found) == pytest.approx(
        {
            "way": OLD,
            "records": 10,
            "scheduled": 20,
            # 5 ms of CPU, 0.4 of them while locked, when no call ended: 4.6 ms per 10 records.
            "cpu_ms_per_1k": 460.0,
            "cpu_ms_per_1k_whole_run": 500.0,
            "cpu_ms_per_1k_net": found.cpu_ms_per_1k_net,
            "call_p50_ms": 2.0,
            "call_p99_ms": 4150.0,
            "call_max_ms": 4150.0,
            "lag_p99_ms": 12.0,
            "lag_max_ms": 12.0,
            "peak_rss_mb": 0.0,
            "lock_records": 0,
            "lock_scheduled": 400,
            "lock_call_max_ms": 4150.0,
            "lock_lag_max_ms": 12.0,
        },
        nan_ok=True,
    )


def test_a_call_made_before_the_lock_and_returned_in_it_did_not_emit_through_it() -> None:
    # An INSERT answered just before the lock was granted, whose call returned just after.
    report = _report()
    report.calls = [(101.99, 102.01), (102.5, 103.99), (103.5, 104.5)]
    found = summarise(report, (102.0, 104.0), rate=100)
    assert found.lock_records == 1


def test_calls_that_end_during_the_lock_count_as_emitted_during_it() -> None:
    report = _report(SDK)
    report.calls = [(102.5 + i, 102.5 + i + 0.0001) for i in range(3)]  # at 102.5, 103.5, 104.5
    found = summarise(report, (102.0, 104.0), rate=100)
    assert (found.lock_records, found.lock_scheduled) == (2, 200)
    assert found.lock_call_max_ms == pytest.approx(0.1)


def _way(way: str, *, cpu: float, p50: float, p99: float, rss: float, lock: int) -> WayResult:
    return WayResult(
        way=way,
        records=3_000 if way in (NOTHING, SDK) else 2_000,
        scheduled=4_000,
        cpu_ms_per_1k=cpu,
        cpu_ms_per_1k_whole_run=cpu * 1.1,
        cpu_ms_per_1k_net=float("nan"),
        call_p50_ms=p50,
        call_p99_ms=p99,
        call_max_ms=10_012.0 if way in (OLD, BATCHED) else p99 * 2,
        lag_p99_ms=1.5,
        lag_max_ms=12.0,
        peak_rss_mb=rss,
        lock_records=lock,
        lock_scheduled=1_000,
        lock_call_max_ms=10_003.0 if way in (OLD, BATCHED) else 0.4,
        lock_lag_max_ms=3.0,
    )


def _results() -> list[WayResult]:
    results = [
        _way(NOTHING, cpu=40.0, p50=0.001, p99=0.004, rss=22.0, lock=1_000),
        _way(OLD, cpu=240.0, p50=1.5, p99=12.0, rss=27.0, lock=0),
        _way(BATCHED, cpu=60.0, p50=0.003, p99=9.0, rss=27.0, lock=95),
        _way(SDK, cpu=80.0, p50=0.02, p99=0.15, rss=34.0, lock=1_000),
    ]
    net_of_own(results)
    return results


def test_the_net_cpu_is_each_ways_less_the_simulated_agents_own() -> None:
    assert [r.cpu_ms_per_1k_net for r in _results()] == [0.0, 200.0, 20.0, 40.0]


def test_the_sdk_is_set_against_the_old_way_on_net_cpu_call_times_and_rss() -> None:
    assert ratios(_results()) == pytest.approx(
        {
            "cpu_ms_per_1k_net": 0.2,
            "call_p50_ms": 0.02 / 1.5,
            "call_p99_ms": 0.15 / 12,
            "peak_rss_mb": 34 / 27,
        }
    )


def test_the_table_shows_every_way_the_ratio_row_and_the_verdict() -> None:
    assert sdk_table(_results(), PLAN).splitlines() == [
        "100 records/s for 40 s; the tables locked for 10 s from 15 s (call: an emit call's wall "
        "time, ms; lag: how late the event loop woke a timer, ms; CPU: ms per 1,000 records "
        "while the tables were not locked, net: less the simulated agent's own)",
        "way             records    CPU    net  call p50  call p99  call max  lag p99  lag max  "
        "peak RSS   locked: records  call max  lag max",
        "nothing     3,000/4,000   40.0    0.0     0.001     0.004     0.008     1.50       12  "
        "   22 MB       1,000/1,000     0.400     3.00",
        "old way     2,000/4,000  240.0  200.0      1.50        12    10,012     1.50       12  "
        "   27 MB           0/1,000    10,003     3.00",
        "batched     2,000/4,000   60.0   20.0     0.003      9.00    10,012     1.50       12  "
        "   27 MB          95/1,000    10,003     3.00",
        "SDK         3,000/4,000   80.0   40.0     0.020     0.150     0.300     1.50       12  "
        "   34 MB       1,000/1,000     0.400     3.00",
        "SDK/old                          0.20     0.013     0.012                              "
        "    1.26",
        "handing a record over costs the SDK 20% of the old way's CPU (net of the simulated "
        "agent's own): within the bar of 20%",
    ]


def test_a_sdk_above_the_bar_is_said_so() -> None:
    results = _results()
    results[-1].cpu_ms_per_1k_net = 50.0
    assert sdk_table(results, PLAN).splitlines()[-1] == (
        "handing a record over costs the SDK 25% of the old way's CPU (net of the simulated "
        "agent's own): ABOVE the bar of 20%"
    )


def test_the_json_holds_the_plan_every_way_and_the_ratios() -> None:
    found = sdk_json(_results(), PLAN)
    assert list(found) == ["plan", "ways", "sdk_over_old", "bar"]
    assert found["plan"] == {
        "rate": 100, "seconds": 40, "lock_at": 15, "lock_seconds": 10, "batch": 100, "tick": 0.05
    }  # fmt: skip
    ways = found["ways"]
    assert isinstance(ways, dict) and list(ways) == list(WAYS)
    assert ways[SDK]["cpu_ms_per_1k_net"] == 40.0
    assert found["bar"] == 0.2
    json.dumps(found)  # as --json writes it


def test_the_simulated_agent_says_ready_then_reports_what_it_emitted() -> None:
    spec = AgentSpec(
        way=NOTHING, rate=100, seconds=0.5, tick=0.05, batch=100, database_url="", kafka={},
        topic_prefix="",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "consumers.bench_sdk"],
        input=json.dumps(asdict(spec)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ready, out, *rest = done.stdout.splitlines()
    assert (ready, rest) == ("ready", [])
    report = json.loads(out)
    emitted = sum(report["emitted"].values())
    assert report["way"] == NOTHING
    assert report["scheduled"] == 50
    assert 0 < emitted <= 50 and emitted % 5 == 0  # whole ticks: a late one is skipped
    expected = Counter(
        stream_of(r) for r in itertools.islice(agent_records(seed=1, now=lambda: AT), emitted)
    )
    assert report["emitted"] == dict(expected)
    assert len(report["calls"]) == emitted
    assert report["peak_rss_mb"] > 0
    assert report["cpu"][0] == [report["started"], 0.0]
    assert report["cpu"][-1] == [report["ended"], report["cpu_s"]]
