"""The bench's pure parts: its options, its optional dependencies, how a py-spy profile is
summarised, and the encryption comparison's table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from consumers.bench import (
    EncryptionResult,
    PoolerResult,
    encryption_table,
    pooler_table,
    profile_breakdown,
)
from pipeline import cli

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
