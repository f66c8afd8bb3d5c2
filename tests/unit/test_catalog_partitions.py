"""The catalog's partitioning keys (pipeline/catalog.py) and the retention settings of
pipeline/config.py: what a stream declares, every refusal with its place, and the operator's
PIPELINE_RETENTION_<STREAM> over the catalog's (docs/streams.md, "Partitions and retention")."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from pipeline import catalog
from pipeline.catalog import CatalogError
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.partitions import Partitioning

WHERE = "f.toml: stream 'orders' (streams[0])"
COLUMNS = (
    'order_id = "uuid"\nplaced_at = "timestamptz"\nday = "date"\n'
    'note = { type = "text", nullable = true }\n'
    'late = { type = "timestamptz", nullable = true }\namount = "numeric"\n'
)
ENV = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "DATABASE_URL": "postgresql://h/db"}


def spec_of(extra: str) -> catalog.StreamSpec:
    text = f'[[streams]]\nname = "orders"\ntopic = "shop.orders"\ntable = "orders"\n{extra}\n'
    _, (spec,) = catalog.parse(text + f"[streams.columns]\n{COLUMNS}", "f.toml")
    return spec


def error_of(extra: str) -> str:
    with pytest.raises(CatalogError) as caught:
        spec_of(extra)
    return str(caught.value)


def test_a_partitioned_append_stream_reads_with_its_defaults() -> None:
    spec = spec_of('key = ["order_id"]\npartition_by = "placed_at"')
    assert spec.partitioning == Partitioning("placed_at", "day", 3, None)
    assert spec.partitioned_tables == ("orders",)
    assert spec.tables.partition_by == "placed_at"
    assert spec.declaration()["partition_by"] == "placed_at"
    assert spec.declaration()["retention"] == "none"


def test_every_key_read_as_declared() -> None:
    spec = spec_of(
        'partition_by = "placed_at"\npartition_interval = "hour"\npartitions_ahead = 24\n'
        'retention = "36h"'
    )
    assert spec.partitioning == Partitioning("placed_at", "hour", 24, datetime.timedelta(hours=36))
    assert spec.declaration()["retention"] == "36h"


def test_a_history_stream_partitions_its_history_table_only() -> None:
    spec = spec_of(
        'mode = "history"\nkey = ["order_id"]\npartition_by = "placed_at"\nretention = "2w"'
    )
    assert spec.partitioned_tables == ("orders_history",)
    assert spec.partitioning is not None
    assert spec.partitioning.retention == datetime.timedelta(weeks=2)


def test_a_stream_without_partition_by_is_not_partitioned() -> None:
    spec = spec_of("")
    assert (spec.partitioning, spec.partitioned_tables, spec.tables.partition_by) == (
        None,
        (),
        None,
    )
    assert spec.declaration()["partition_by"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            'mode = "latest"\nkey = ["order_id"]\npartition_by = "placed_at"',
            'partition_by: a "latest" table is not partitioned: it holds a row per key, and '
            'its key holds no time (a "history" stream partitions its history table)',
            id="latest",
        ),
        pytest.param(
            'partition_by = "shipped_at"',
            "partition_by: 'shipped_at' is not a column of the stream",
            id="no-such-column",
        ),
        pytest.param(
            'partition_by = "amount"',
            "partition_by: 'amount' is numeric; a stream is partitioned by a timestamptz or "
            "date column",
            id="not-a-time",
        ),
        pytest.param(
            'partition_by = "late"',
            "partition_by: 'late' is nullable; a partition column must always have a value",
            id="nullable",
        ),
        pytest.param(
            'partition_by = "day"\npartition_interval = "hour"',
            "partition_interval: \"hour\" needs a timestamptz column; 'day' is a date",
            id="hour-of-a-date",
        ),
        pytest.param(
            'partition_by = "placed_at"\npartitions_ahead = 0',
            "partitions_ahead: 0 must be from 1 to 1000",
            id="ahead-zero",
        ),
        pytest.param(
            'partition_by = "placed_at"\npartitions_ahead = 1001',
            "partitions_ahead: 1001 must be from 1 to 1000",
            id="ahead-too-many",
        ),
        pytest.param(
            'partition_by = "placed_at"\nretention = "90 days"',
            "retention: retention '90 days' must be a whole number of hours, days or weeks, "
            'such as "36h", "90d" or "2w" (or "none")',
            id="retention-form",
        ),
        pytest.param(
            'retention = "90d"',
            "retention: is for a partitioned stream: declare partition_by first",
            id="retention-alone",
        ),
        pytest.param(
            'partition_interval = "day"',
            "partition_interval: is for a partitioned stream: declare partition_by first",
            id="interval-alone",
        ),
    ],
)
def test_a_refusal_names_the_stream_and_the_key(extra: str, message: str) -> None:
    assert error_of(extra) == f"{WHERE}: {message}"


def test_an_unknown_interval_is_named_with_the_choices() -> None:
    message = error_of('partition_by = "placed_at"\npartition_interval = "year"')
    assert message == (
        f"{WHERE}: partition_interval: unknown interval 'year'; choose from hour, day, week, month"
    )


def test_the_builtin_row_per_record_tables_are_partitioned_by_day_of_ts() -> None:
    partitioned = {
        s.name: (s.partitioned_tables, s.partitioning) for s in catalog.load().partitioned
    }
    day = Partitioning("ts", "day", 3, None)
    assert partitioned == {
        "states": (("agent_state_history",), day),
        "events": (("system_events",), day),
        "metrics": (("performance_metrics",), day),
        "analytics": (("user_analytics",), day),
        "config": (("system_config_history",), day),
    }


def test_the_operators_retention_wins_over_the_catalogs() -> None:
    config = load_config(
        {**ENV, "PIPELINE_RETENTION_METRICS": "30d", "PIPELINE_RETENTION_EVENTS": "none"}
    )
    assert config.retention == {"metrics": "30d", "events": "none"}
    partitioning = config.catalog["metrics"].partitioning
    assert partitioning is not None
    assert partitioning.retention == datetime.timedelta(days=30)
    events = config.catalog["events"].partitioning
    assert events is not None and events.retention is None
    # A stream no setting names keeps the catalog's.
    analytics = config.catalog["analytics"].partitioning
    assert analytics is not None and analytics.retention is None
    assert load_config(ENV).catalog["metrics"].partitioning == Partitioning("ts", "day", 3, None)


def test_a_bad_retention_setting_fails_at_start_naming_each_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            {
                **ENV,
                "PIPELINE_RETENTION_METRIX": "30d",
                "PIPELINE_RETENTION_STATES": "3x",
            }
        )
    assert str(caught.value) == (
        "PIPELINE_RETENTION_METRIX: metrix: no such stream; choose from states, events, "
        "metrics, analytics, config; PIPELINE_RETENTION_STATES: states: retention '3x' must "
        'be a whole number of hours, days or weeks, such as "36h", "90d" or "2w" (or "none")'
    )


def test_a_retention_for_a_stream_that_is_not_partitioned_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "shop.toml"
    file.write_text(
        '[[streams]]\nname = "orders"\ntopic = "shop.orders"\ntable = "orders"\n'
        '[streams.columns]\norder_id = "uuid"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config({**ENV, "PIPELINE_STREAMS_FILE": str(file), "PIPELINE_RETENTION_ORDERS": "7d"})
    assert str(caught.value) == (
        "PIPELINE_RETENTION_ORDERS: orders: the stream is not partitioned (no partition_by)"
    )
