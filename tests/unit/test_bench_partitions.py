"""`pipeline bench --partitioning`'s pure parts: the rows it loads, the tables it compares, how
it reads EXPLAIN and DELETE, what it prints (consumers/bench_partitions.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumers.bench_partitions import (
    FIRST_DAY,
    DropRun,
    PartitionBench,
    QueryResult,
    QueryRun,
    _chunks,
    _unpartitioned,
    as_json,
    day_ranges,
    deleted,
    query_result,
    query_run,
    table,
    tick,
)
from pipeline import cli, schema_plan
from pipeline.catalog import load as load_catalog
from pipeline.partitions import Range
from producers.simulator import FleetSimulator, Mix

DAY = Range(datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC))

# PostgreSQL 15's EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) of a query pruned to one partition
# of five, trimmed to the keys the bench reads and a few it ignores.
PRUNED = [
    {
        "Plan": {
            "Node Type": "Seq Scan",
            "Relation Name": "performance_metrics_p20261105",
            "Alias": "performance_metrics",
            "Actual Rows": 6993,
            "Shared Hit Blocks": 20140,
            "Shared Read Blocks": 3,
        },
        "Planning": {"Shared Hit Blocks": 1},
        "Planning Time": 0.071,
        "Triggers": [],
        "Execution Time": 61.5,
    }
]
# Of the unpartitioned table: a bitmap heap scan over its BRIN index.
BITMAP = [
    {
        "Plan": {
            "Node Type": "Bitmap Heap Scan",
            "Relation Name": "performance_metrics_unpartitioned",
            "Actual Rows": 6993,
            "Shared Hit Blocks": 24000,
            "Shared Read Blocks": 0,
            "Plans": [
                {
                    "Node Type": "Bitmap Index Scan",
                    "Index Name": "performance_metrics_unpartitioned_ts",
                    "Actual Rows": 240000,
                }
            ],
        },
        "Planning Time": 0.05,
        "Execution Time": 80.25,
    }
]
# Two partitions scanned under an Append (a range across midnight): both named, once each.
APPEND = [
    {
        "Plan": {
            "Node Type": "Append",
            "Actual Rows": 10,
            "Plans": [
                {"Node Type": "Seq Scan", "Relation Name": "m_p20261104", "Actual Rows": 4},
                {"Node Type": "Seq Scan", "Relation Name": "m_p20261105", "Actual Rows": 6},
                {"Node Type": "Seq Scan", "Relation Name": "m_p20261105", "Actual Rows": 0},
            ],
        },
        "Planning Time": 0.2,
        "Execution Time": 1.0,
    }
]


def test_query_run_reads_time_rows_buffers_and_the_one_partition_scanned() -> None:
    assert query_run(PRUNED) == QueryRun(
        61.5, 0.071, 6993, 20140, 3, ("performance_metrics_p20261105",)
    )
    assert query_run(BITMAP).scanned == ("performance_metrics_unpartitioned",)
    assert query_run(APPEND).scanned == ("m_p20261104", "m_p20261105")
    assert query_run(APPEND).shared_hit == 0  # no BUFFERS keys: none counted


def test_query_result_is_the_median_of_the_runs_with_the_last_runs_buffers() -> None:
    runs = [
        QueryRun(9.0, 0.3, 5, 100, 7, ("p",)),
        QueryRun(1.0, 0.1, 5, 101, 0, ("p",)),
        QueryRun(2.0, 0.2, 5, 102, 0, ("p",)),
    ]
    result = query_result("t", runs, 5, "plan")
    assert (result.execution_ms, result.planning_ms) == (2.0, 0.2)
    assert (result.shared_hit, result.shared_read, result.partitions_total) == (102, 0, 5)


def test_deleted_reads_the_row_count_of_a_delete_status() -> None:
    assert deleted("DELETE 1000000") == 1_000_000
    with pytest.raises(ValueError, match="not a DELETE status: 'UPDATE 3'"):
        deleted("UPDATE 3")


def test_days_are_consecutive_utc_days_from_the_first() -> None:
    days = day_ranges(FIRST_DAY, 3)
    assert [d.start.day for d in days] == [2, 3, 4]
    assert all(d.end - d.start == timedelta(days=1) for d in days)
    assert days[0].end == days[1].start


def test_ticks_spread_a_days_rows_over_the_day_in_bursts_and_in_order() -> None:
    ticks = [tick(DAY, 1000, i) for i in range(1000)]
    assert ticks[0] == DAY.start
    assert ticks == sorted(ticks)
    assert len(set(ticks)) == 10  # bursts of 100
    assert ticks[-1] == DAY.start + timedelta(hours=21.6)  # the last of ten bursts, in the day
    assert tick(DAY, 1, 0) == DAY.start


def _fleet() -> FleetSimulator:
    return FleetSimulator(seed=1, mix=Mix(states=0, events=0, metrics=1, analytics=0, config=0))


def test_the_rows_are_the_fleets_metrics_day_by_day_with_consecutive_offsets() -> None:
    chunks = list(_chunks(_fleet(), rows_per_day=50_000, days=2))
    rows = [row for chunk in chunks for row in chunk]
    assert [len(c) for c in chunks] == [20_000, 20_000, 10_000] * 2
    assert len(rows) == 100_000
    assert [r[6] for r in rows] == list(range(100_000))  # src_offset
    first, second = day_ranges(FIRST_DAY, 2)
    assert all(first.start <= r[3] < first.end for r in rows[:50_000])
    assert all(second.start <= r[3] < second.end for r in rows[50_000:])
    assert [r[3] for r in rows] == sorted(r[3] for r in rows)
    assert len({r[0] for r in rows}) == 143
    assert {r[1] for r in rows} == {
        "cpu_percent",
        "memory_mb",
        "latency_ms",
        "queue_depth",
        "throughput_rps",
    }
    assert rows[0][4].startswith('{"host":"host-')
    # The same rows every time: both tables, and every run of the bench, get them.
    assert rows[:100] == [r for c in _chunks(_fleet(), 50_000, 1) for r in c][:100]


def test_the_unpartitioned_table_is_the_metrics_table_without_partition_by() -> None:
    shape = schema_plan.shapes(load_catalog()["metrics"])[0]
    flat = _unpartitioned(shape)
    assert shape.partition_by == "ts"
    assert flat.name == "performance_metrics_unpartitioned"
    assert flat.partition_by is None
    assert (flat.columns, flat.primary_key) == (shape.columns, shape.primary_key)
    assert [(i.name, i.columns, i.using) for i in flat.indexes] == [
        ("performance_metrics_unpartitioned_source", ("src_partition", "src_offset"), "brin"),
        ("performance_metrics_unpartitioned_ts", ("ts",), "brin"),
    ]
    assert "PARTITION BY" not in schema_plan.create_table(flat)
    same = schema_plan.create_table(flat).replace("_unpartitioned", "")
    assert schema_plan.create_table(shape) == same + ' PARTITION BY RANGE ("ts")'


def _result() -> PartitionBench:
    query = QueryResult(
        "performance_metrics",
        60.0,
        0.07,
        6993,
        20140,
        0,
        ("pm_p20261105",),
        5,
        "Seq Scan on pm_p20261105",
    )
    flat = QueryResult(
        "pm_unpartitioned", 80.0, 0.05, 6993, 24000, 0, ("pm_unpartitioned",), 0, "Bitmap Heap Scan"
    )
    return PartitionBench(
        rows_per_day=1_000_000,
        days=4,
        runs=5,
        load_s=70.0,
        query_day="2026-11-05",
        agent="agent-0042",
        queries=(query, flat),
        drops=(
            DropRun("2026-11-02", 0.02, 4.0, 1.0, 1_000_000),
            DropRun("2026-11-03", 0.01, 3.0, 2.0, 1_000_000),
            DropRun("2026-11-04", 0.03, 5.0, 0.5, 1_000_000),
        ),
        unpartitioned_bytes=(700 * 1024 * 1024, 700 * 1024 * 1024),
        server="PostgreSQL 15.18",
    )


def test_the_table_sets_delete_and_its_vacuum_against_detach_and_drop() -> None:
    printed = table(_result())
    assert "median of 3 runs" in printed
    assert "DETACH + DROP of the day's partition      0.020 s" in printed
    assert "DELETE of the same rows                  4.000 s" in printed
    assert "then VACUUM (reported apart)              1.000 s" in printed
    assert "DELETE / (DETACH + DROP): 200x; with VACUUM: 250x" in printed
    assert "700 MB before, 700 MB after" in printed
    assert "1 of 5 partitions (pm_p20261105)" in printed
    assert "    Seq Scan on pm_p20261105" in printed


def test_the_json_holds_every_run_and_the_medians() -> None:
    out = as_json(_result())
    assert (out["detach_drop_s"], out["delete_s"], out["vacuum_s"]) == (0.02, 4.0, 1.0)
    assert len(out["drops"]) == 3  # type: ignore[arg-type]
    assert out["queries"][0]["scanned"] == ("pm_p20261105",)  # type: ignore[index]


def test_rows_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--partitioning", "--rows", "0"])
    assert exit_.value.code == 2
    assert "argument --rows" in capsys.readouterr().err


def test_partitioning_is_its_own_measurement() -> None:
    args = cli.parser().parse_args(["bench", "--partitioning", "--rows", "5000"])
    assert (args.partitioning, args.rows) == (True, 5000)
    assert cli.parser().parse_args(["bench"]).partitioning is False


@pytest.mark.parametrize("other", [["--sdk"], ["--secure"], ["--pooler", "session"]])
def test_partitioning_is_one_measurement_at_a_time(
    other: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "--partitioning", *other]) == 2
    assert "are separate measurements: give one at a time" in capsys.readouterr().err
