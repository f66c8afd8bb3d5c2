"""The bench's pure parts: its options, its optional dependencies, how a py-spy profile is
summarised, the catalog mix's streams and records, and the tables and JSON it reports."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tomllib
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from consumers.bench import (
    BASELINE_FILE,
    BENCH_STREAMS_FILE,
    CATALOG_MIX,
    EncryptionResult,
    MemoryResult,
    MixResult,
    PoolerResult,
    as_json,
    baseline_record,
    baseline_source,
    baseline_table,
    catalog_records,
    catalog_rows,
    compare_with_baseline,
    cpu_seconds,
    encryption_table,
    machine_facts,
    per_million,
    plot,
    pooler_table,
    profile_breakdown,
    read_baseline,
    streams_of,
    table,
)
from pipeline import cli
from pipeline.commands.bench import _default_mixes
from pipeline.errors import ConfigError
from pipeline.rows import decoder

ROOT = Path(__file__).resolve().parents[2]

LOOP = "main (pipeline/cli.py:38);BaseEventLoop.run_forever (asyncio/base_events.py:607)"
FILL = f"{LOOP};DatabaseAgent._fill_batch (consumers/agent.py:206)"


def test_profile_breakdown_charges_each_sample_to_its_innermost_known_owner() -> None:
    stacks = "\n".join(
        [
            # Start-up, outside the event loop: not counted.
            "<module> (pipeline/cli.py:22);_find_and_load (<frozen importlib._bootstrap>:1176) 50",
            f"{FILL};StreamDecoder.rows (pipeline/rows.py:185) 40",
            f"{FILL};AIOKafkaConsumer.getmany (aiokafka/consumer/consumer.py:1197);"
            "PartitionRecords._unpack_records (aiokafka/consumer/fetcher.py:262) 30",
            f"{LOOP};BaseEventLoop._run_once (asyncio/base_events.py:1910);"
            "EpollSelector.select (selectors.py:468) 15",
            f"{FILL};Batch.add (pipeline/batching.py:122) 5",
            f"{LOOP};Connection.copy_records_to_table (asyncpg/connection.py:1150);"
            "_encode_jsonb (pipeline/db.py:72) 4",
            f"{LOOP};Connection.copy_records_to_table (asyncpg/connection.py:1150) 4",
            f"{LOOP};Handle._run (asyncio/events.py:80) 2",
        ]
    )
    assert profile_breakdown(stacks).splitlines() == [
        " 40.0%  ours: decoding into rows (msgspec's C decoder + our Python)",
        " 30.0%  aiokafka: fetching, unpacking records",
        " 15.0%  idle: waiting for PostgreSQL or Kafka",
        "  9.0%  ours: other (batching, planning, writing, metrics)",
        "  4.0%  asyncpg: COPY encoding, protocol",
        "  2.0%  Python runtime and asyncio",
        "of 100 samples; our busiest lines:",
        " 40.0%    pipeline/rows.py:185 StreamDecoder.rows",
        "  5.0%    pipeline/batching.py:122 Batch.add",
        "  4.0%    pipeline/db.py:72 _encode_jsonb",
    ]


def test_profile_breakdown_of_no_samples_says_so() -> None:
    assert profile_breakdown("") == "no samples"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["--latency-seconds", "0"], "argument --latency-seconds: must be above 0, got 0"
        ),
        pytest.param(["--records", "-5"], "argument --records: must be above 0, got -5"),
        pytest.param(
            ["--records", "1.5"], "argument --records: expected a whole number, got '1.5'"
        ),
        pytest.param(["--latency-rate", "fast"], "argument --latency-rate: expected a number"),
        pytest.param(["--mix", "bogus"], "argument --mix: invalid choice: 'bogus'"),
    ],
)
def test_bench_options_are_checked_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "lacks"),
    [
        pytest.param([], "matplotlib (it draws the PNG)", id="plain"),
        pytest.param(
            ["--profile", "profiles"],
            "matplotlib (it draws the PNG) and py-spy (for --profile)",
            id="profile",
        ),
    ],
)
def test_bench_without_its_extra_stops_before_anything_starts(
    argv: list[str],
    lacks: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))  # no py-spy there
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_DEV_HOME", str(tmp_path / "stack"))
    assert cli.main(["bench", "--quick", *argv]) == 2
    assert capsys.readouterr().err == (
        f"pipeline: error: pipeline bench needs its extra, and this environment lacks {lacks}: "
        f"install it with `{tmp_path / 'bin' / 'python'} -m pip install -e '.[bench]'` in the "
        "repository (`make demo` and `make test` install it into .venv)\n"
    )
    assert not (tmp_path / "stack").exists()  # no local stack was started


def test_the_encryption_table_sets_each_rate_against_plaintext() -> None:
    result = EncryptionResult(
        "metrics-heavy",
        1_000_000,
        produce_per_s={"plaintext": 30_000.0, "SASL_SSL": 27_000.0},
        raw_consume_per_s={"plaintext": 200_000.0, "SASL_SSL": 100_000.0},
        e2e_rows_per_s={"plaintext": 250_000.0, "SASL_SSL": 225_000.0},
    )
    assert encryption_table([result]).splitlines() == [
        "metrics-heavy, 1,000,000 records: SASL_SSL against plaintext",
        "  produce records/s      plaintext      30,000   SASL_SSL      27,000   ratio 0.90",
        "  raw consume records/s  plaintext     200,000   SASL_SSL     100,000   ratio 0.50",
        "  end to end rows/s      plaintext     250,000   SASL_SSL     225,000   ratio 0.90",
    ]


def test_the_pooler_table_sets_the_pooled_rate_against_direct() -> None:
    result = PoolerResult(
        "events-heavy", 100_000, {"direct": 200_000.0, "PgBouncer (transaction)": 150_000.0}
    )
    assert pooler_table([result]).splitlines() == [
        "events-heavy, 100,000 records: PgBouncer (transaction) against direct",
        "  end to end rows/s      direct     200,000   PgBouncer (transaction)     150,000"
        "   ratio 0.75",
    ]


def test_the_bench_catalog_loads_with_three_user_streams_and_no_builtin_one() -> None:
    streams = streams_of(CATALOG_MIX)
    assert streams.file == BENCH_STREAMS_FILE
    assert [(s.name, s.table, s.mode, s.key, s.version) for s in streams.catalog] == [
        ("readings", "sensor_readings", "append", (), None),
        ("clicks", "clicks", "append", ("click_id",), None),
        ("orders", "orders", "latest", ("order_id",), "revision"),
    ]
    assert streams.catalog["clicks"].column("clicked_at").unit == "ms"
    assert streams.catalog["clicks"].column("country").path == ("user", "geo", "country")
    assert streams_of("metrics-heavy").file is None
    assert "readings" not in streams_of("metrics-heavy").catalog


def test_the_bench_catalog_ships_with_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["consumers"]
    assert BENCH_STREAMS_FILE.relative_to(ROOT / "consumers").as_posix() in data


def test_catalog_records_are_the_same_for_the_same_seed() -> None:
    first = list(itertools.islice(catalog_records(seed=1), 2_000))
    assert first == list(itertools.islice(catalog_records(seed=1), 2_000))
    assert first != list(itertools.islice(catalog_records(seed=2), 2_000))
    assert [r.stream for r in first[:10]] == ["readings"] * 7 + ["clicks"] * 2 + ["orders"]


@pytest.mark.parametrize("records", [0, 1, 7, 9, 10, 999, 5_003])
def test_catalog_records_decode_without_rejection_into_the_rows_catalog_rows_counts(
    records: int,
) -> None:
    catalog = streams_of(CATALOG_MIX).catalog
    decoders = {spec.name: decoder(spec) for spec in catalog}
    appended: dict[str, int] = defaultdict(int)
    keys: dict[str, set[object]] = defaultdict(set)
    latest: dict[object, int] = {}
    for offset, r in enumerate(itertools.islice(catalog_records(seed=1), records)):
        row = decoders[r.stream].row(r.value, (), 0, offset, 1, key=r.key)  # raises if refused
        if r.stream == "readings":
            appended[r.stream] += 1
            assert r.key is None
        else:
            assert r.key == str(row[0]).encode()  # the uuid key is the Kafka key
            keys[r.stream].add(row[0])
        if r.stream == "orders":
            latest[row[0]] = max(latest.get(row[0], 0), row[1])
    assert catalog_rows(records) == {
        "readings": appended["readings"],
        "clicks": len(keys["clicks"]),
        "orders": len(keys["orders"]),
    }
    assert all(isinstance(k, uuid.UUID) for k in keys["clicks"] | keys["orders"])
    assert set(latest.values()) <= {1, 2, 3, 4}


def test_catalog_records_hold_redelivered_clicks_and_late_revisions() -> None:
    records = list(itertools.islice(catalog_records(seed=1), 1_000))
    clicks = [r for r in records if r.stream == "clicks"]
    assert len(clicks) == 200
    assert clicks[49] == clicks[48] and clicks[99] == clicks[98]  # every 50th: sent again
    assert len(set(clicks)) == 196
    assert catalog_rows(1_000) == {"readings": 700, "clicks": 196, "orders": 25}
    orders_decoder = decoder(streams_of(CATALOG_MIX).catalog["orders"])
    by_order = [
        orders_decoder.row(r.value, (), 0, n, 1)[1]
        for n, r in enumerate(records)
        if r.stream == "orders"
    ]
    assert by_order[:8] == [1, 2, 3, 4, 1, 3, 2, 4]  # the second order's 2nd revision is late


def _result(
    mix: str, consume: float, copy: float, e2e: float, cpu: float = 3.104, *, replay: float = 1.0
) -> MixResult:
    return MixResult(
        mix=mix,
        records=50_000,
        raw_consume_per_s=consume,
        raw_copy_per_s=copy,
        e2e_rows_per_s=e2e,
        cpu_s_per_1m_rows=cpu,
        ratio=e2e / min(consume, copy),
        copy_ratio=e2e / copy,
        replay_records_per_s=replay,
        replay_ratio=replay / e2e,
        peak_rss_mb=100.4,
        e2e_two_processes_rows_per_s=None,
        p50_ms=114.3,
        p99_ms=210.3,
        max_ms=217.3,
        latency_rate=20_000.0,
        drain_curve=[(0.0, 0), (1.0, 50_000)],
        latencies_ms=[114.3, 210.3, 217.3],
    )


RESULTS = [
    _result("metrics-heavy", 400_000.0, 300_000.0, 180_000.0, replay=108_000.0),
    _result(CATALOG_MIX, 200_000.0, 400_000.0, 160_000.0, replay=152_000.0),
]
MEMORY = MemoryResult(20_000, 73.1, 74_753.0)


def test_the_table_sets_every_mix_against_its_raw_limits_raw_copy_and_its_replay() -> None:
    assert table(RESULTS, MEMORY).splitlines() == [
        "mix              records  raw consume/s  raw COPY/s  e2e rows/s  CPU-s/1M  ratio  /COPY  "
        "replay/s  /live  x2 procs/s  p50 ms  p99 ms  max ms  peak RSS",
        "metrics-heavy     50,000        400,000     300,000     180,000      3.10   0.60   0.60  "
        " 108,000   0.60           -     114     210     217    100 MB",
        "catalog           50,000        200,000     400,000     160,000      3.10   0.80   0.40  "
        " 152,000   0.95           -     114     210     217    100 MB",
        "peak RSS of one agent draining 20,000 records: 73 MB (74,753 rows/s)",
    ]


def test_the_json_holds_every_mix_with_its_ratio_to_raw_copy() -> None:
    found = as_json(RESULTS, MEMORY)
    assert list(found) == ["metrics-heavy", "catalog", "memory"]
    catalog = found["catalog"]
    assert isinstance(catalog, dict)
    assert catalog["copy_ratio"] == 0.4
    assert catalog["cpu_s_per_1m_rows"] == 3.104
    assert catalog["ratio"] == 0.8
    assert catalog["replay_records_per_s"] == 152_000.0
    assert catalog["replay_ratio"] == 0.95
    assert "drain_curve" not in catalog and "latencies_ms" not in catalog
    assert found["memory"] == {"records": 20_000, "peak_rss_mb": 73.1, "rows_per_s": 74_753.0}


def test_the_plot_draws_every_mix(tmp_path: Path) -> None:
    plot(RESULTS, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "mixes"),
    [
        pytest.param([], ["metrics-heavy", "events-heavy", "catalog"], id="measurements"),
        pytest.param(["--secure"], ["metrics-heavy", "events-heavy"], id="secure"),
        pytest.param(["--pooler", "session"], ["metrics-heavy", "events-heavy"], id="pooler"),
    ],
)
def test_without_mix_the_bench_runs_every_mix_and_its_route_comparisons_the_builtin_ones(
    argv: list[str], mixes: list[str]
) -> None:
    assert _default_mixes(cli.parser().parse_args(["bench", *argv])) == mixes


def test_cpu_seconds_are_utime_and_stime_counted_from_the_last_parenthesis() -> None:
    # A command name may hold spaces and parentheses: fields are counted after the last ")".
    fields = ["S", *map(str, range(1, 11)), "250", "70", "9", "9", "20", "0"]
    stat = f"4242 (python3 (x) y) {' '.join(fields)}"
    assert cpu_seconds(stat, ticks_per_s=100) == 3.2


def test_cpu_seconds_of_this_process_count_its_own_cpu() -> None:
    spent = cpu_seconds(Path("/proc/self/stat").read_text())
    times = os.times()
    assert 0 < spent <= times.user + times.system + 0.01


@pytest.mark.parametrize(
    ("cpu_s", "rows", "expected"),
    [(3.1, 1_000_000, 3.1), (0.31, 100_000, 3.1), (0.5, 2_000_000, 0.25)],
)
def test_cpu_per_million_rows(cpu_s: float, rows: int, expected: float) -> None:
    assert per_million(cpu_s, rows) == pytest.approx(expected)


def test_cpu_per_million_of_no_rows_is_not_a_number() -> None:
    assert math.isnan(per_million(1.0, 0))


def test_the_baseline_records_each_mix_with_the_commit_date_command_and_machine() -> None:
    found = baseline_record(
        RESULTS,
        partitions=6,
        commit="0123456789abcdef",
        recorded_at="2026-12-07T16:13:12+00:00",
        command="pipeline bench --record-baseline",
        machine={"cpus": 2, "load_average_before": [1.5, 1.2, 1.0]},
    )
    assert found == {
        "recorded_at": "2026-12-07T16:13:12+00:00",
        "commit": "0123456789abcdef",
        "command": "pipeline bench --record-baseline",
        "machine": {"cpus": 2, "load_average_before": [1.5, 1.2, 1.0]},
        "partitions": 6,
        "mixes": {
            "metrics-heavy": {
                "records": 50_000,
                "e2e_rows_per_s": 180_000.0,
                "cpu_s_per_1m_rows": 3.104,
            },
            "catalog": {"records": 50_000, "e2e_rows_per_s": 160_000.0, "cpu_s_per_1m_rows": 3.104},
        },
    }


def test_a_run_is_compared_with_its_baseline_and_a_drift_beyond_five_percent_flagged() -> None:
    baseline = baseline_record(
        [
            _result("metrics-heavy", 1.0, 1.0, 200_000.0, 3.0),
            _result("events-heavy", 1.0, 1.0, 150_000.0, 4.0),
            _result(CATALOG_MIX, 1.0, 1.0, 100_000.0, 2.0),
        ],
        partitions=6,
        commit="0123456789abcdef",
        recorded_at="2026-12-07T16:13:12+00:00",
        command="pipeline bench",
        machine={},
    )
    now = [
        _result("metrics-heavy", 1.0, 1.0, 188_000.0, 3.3),  # 6% slower, 10% more CPU
        _result("events-heavy", 1.0, 1.0, 157_000.0, 3.85),  # 4.7% faster, 3.75% less CPU
        _result(CATALOG_MIX, 1.0, 1.0, 110_000.0, 1.8),  # 10% faster, 10% less CPU
    ]
    drifts, notes = compare_with_baseline(now, baseline, partitions=6)
    assert notes == []
    assert baseline_table(drifts, notes, "bench_baseline.json: commit 012345678").splitlines() == [
        "against the baseline (bench_baseline.json: commit 012345678), drift flagged beyond 5%:",
        "mix            measure     baseline        now  ratio",
        "metrics-heavy  rows/s       200,000    188,000   0.94  DRIFT: slower by 6%",
        "metrics-heavy  CPU-s/1M        3.00       3.30   1.10  DRIFT: more CPU by 10%",
        "events-heavy   rows/s       150,000    157,000   1.05  ok",
        "events-heavy   CPU-s/1M        4.00       3.85   0.96  ok",
        "catalog        rows/s       100,000    110,000   1.10  DRIFT: faster by 10%",
        "catalog        CPU-s/1M        2.00       1.80   0.90  DRIFT: less CPU by 10%",
    ]
    assert [d.flagged for d in drifts] == [True, True, False, False, True, True]


def test_a_measure_that_failed_is_flagged() -> None:
    baseline = baseline_record(
        [_result("metrics-heavy", 1.0, 1.0, 200_000.0, 3.0)],
        partitions=6, commit="c", recorded_at="t", command="pipeline bench", machine={},
    )  # fmt: skip
    drifts, _ = compare_with_baseline(
        [_result("metrics-heavy", 1.0, 1.0, 200_000.0, float("nan"))], baseline, partitions=6
    )
    assert [(d.measure, d.flagged, d.verdict()) for d in drifts] == [
        ("rows/s", False, "ok"),
        ("CPU-s/1M", True, "DRIFT: not measured"),
    ]


def test_mixes_the_baseline_measured_otherwise_are_not_compared_and_say_why() -> None:
    baseline = baseline_record(
        [_result("metrics-heavy", 1.0, 1.0, 200_000.0, 3.0)],
        partitions=6, commit="c", recorded_at="t", command="pipeline bench", machine={},
    )  # fmt: skip
    small = _result("metrics-heavy", 1.0, 1.0, 100_000.0, 5.0)
    small.records = 100_000
    drifts, notes = compare_with_baseline([small, RESULTS[1]], baseline, partitions=6)
    assert drifts == []
    assert notes == [
        "metrics-heavy: the baseline drained 50,000 records on 6 partitions, this run 100,000 on "
        "6: not compared",
        "catalog: not in the baseline",
    ]
    drifts, notes = compare_with_baseline(RESULTS[:1], baseline, partitions=12)
    assert (drifts, notes) == (
        [],
        [
            "metrics-heavy: the baseline drained 50,000 records on 6 partitions, this run 50,000 "
            "on 12: not compared"
        ],
    )


def test_without_a_baseline_the_bench_says_how_to_record_one(tmp_path: Path) -> None:
    assert read_baseline(tmp_path / "none.json") is None
    drifts, notes = compare_with_baseline(RESULTS, None, partitions=6)
    assert baseline_table(drifts, notes, str(tmp_path / "none.json")).splitlines() == [
        f"against the baseline ({tmp_path / 'none.json'}), drift flagged beyond 5%:",
        "no baseline: record one with `pipeline bench --record-baseline`",
    ]


def test_a_baseline_file_is_read_back_as_written_and_named_by_commit_and_date(
    tmp_path: Path,
) -> None:
    record = baseline_record(
        RESULTS, partitions=6, commit="0123456789abcdef", recorded_at="2026-12-07T16:13:12+00:00",
        command="pipeline bench", machine={},
    )  # fmt: skip
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(record))
    assert read_baseline(path) == record
    assert baseline_source(path, record) == (
        "baseline.json: commit 012345678, recorded 2026-12-07T16:13:12+00:00"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param("{", "not a baseline the bench wrote: Expecting", id="not JSON"),
        pytest.param(
            '{"commit": "c"}', 'not a baseline the bench wrote (no "mixes")', id="no mixes"
        ),
    ],
)
def test_a_file_that_is_not_a_baseline_is_an_error_naming_it(
    text: str, why: str, tmp_path: Path
) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"--baseline {path}: {why}")):
        read_baseline(path)


def test_the_committed_baseline_is_one_the_bench_reads() -> None:
    baseline = read_baseline(BASELINE_FILE)
    assert baseline is not None
    assert set(baseline) == {"recorded_at", "commit", "command", "machine", "partitions", "mixes"}
    machine = baseline["machine"]
    assert isinstance(machine, dict)
    assert {"cpu", "cpus", "load_average_before", "load_average_after"} <= set(machine)


def test_the_machine_facts_say_how_loaded_the_machine_was() -> None:
    facts = machine_facts((1.25, 1.5, 2.0))
    assert facts["load_average_before"] == [1.25, 1.5, 2.0]
    after = facts["load_average_after"]
    assert isinstance(after, list) and len(after) == 3
    assert facts["cpus"] == os.cpu_count()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["--secure", "--sdk"],
            "--secure and --sdk are separate measurements: give one at a time",
        ),
        pytest.param(
            ["--secure", "--pooler", "session"],
            "--secure and --pooler are separate measurements: give one at a time",
        ),
        pytest.param(
            ["--sdk", "--record-baseline"],
            "--record-baseline records the usual measurements, not --sdk",
        ),
        pytest.param(
            ["--sdk", "--sdk-seconds", "10"],
            "--sdk-seconds must be above 10, the lock's time, got 10",
        ),
    ],
)
def test_bench_modes_that_do_not_go_together_stop_before_anything_starts(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PIPELINE_DEV_HOME", str(tmp_path / "stack"))
    assert cli.main(["bench", *argv]) == 2
    assert capsys.readouterr().err == f"pipeline: error: {message}\n"
    assert not (tmp_path / "stack").exists()  # no local stack was started


def test_a_broken_baseline_stops_the_bench_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPELINE_DEV_HOME", str(tmp_path / "stack"))
    (tmp_path / "b.json").write_text("[]")
    assert cli.main(["bench", "--baseline", str(tmp_path / "b.json")]) == 2
    assert capsys.readouterr().err == (
        f"pipeline: error: --baseline {tmp_path / 'b.json'}: not a baseline the bench wrote "
        '(no "mixes")\n'
    )
    assert not (tmp_path / "stack").exists()
