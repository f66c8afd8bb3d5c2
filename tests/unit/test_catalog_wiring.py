"""What is keyed by a stream name takes any stream of the catalog: topics, ACLs, the agent's
maps and metrics, command-line stream checks, replay and dead-letter lookups, `pipeline top`;
and the typed records (the simulator's and the benchmark's traffic) stay the built-in mix."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from consumers.agent import DatabaseAgent
from pipeline import kafka, testbed
from pipeline.catalog import load
from pipeline.commands._common import check_streams, stream_list
from pipeline.config import Config, load_config
from pipeline.devstack.kafka_auth import pipeline_acls
from pipeline.errors import ConfigError
from pipeline.records import RECORD_STREAMS, record_key, stream_of
from pipeline.redrive import stream_of as letter_stream
from pipeline.replay import ReplayError, parse_streams
from producers.simulator import FleetSimulator, Mix
from tests.builtin_streams import STREAM_BY_NAME

ORDERS = """
[[streams]]
name = "orders"
topic = "shop.orders"
table = "shop.orders"

[streams.columns]
order_id = "uuid"
amount = "numeric"
"""
BUILTIN_TOPICS = [
    "p.agents.states",
    "p.agents.events",
    "p.agents.metrics",
    "p.users.analytics",
    "p.system.config",
]


@pytest.fixture
def streams_file(tmp_path: Path) -> Path:
    path = tmp_path / "streams.toml"
    path.write_text(ORDERS)
    return path


def config(streams_file: Path | None, **env: str) -> Config:
    environ = {
        "KAFKA_BOOTSTRAP_SERVERS": "localhost:9",
        "DATABASE_URL": "postgresql://u@localhost:9/d",
        "PIPELINE_TOPIC_PREFIX": "p.",
        **env,
    }
    if streams_file is not None:
        environ["PIPELINE_STREAMS_FILE"] = str(streams_file)
    return load_config(environ)


def test_the_data_topics_are_the_catalogs(streams_file: Path) -> None:
    assert kafka.data_topics(config(None)) == BUILTIN_TOPICS
    assert kafka.data_topics(config(streams_file)) == [*BUILTIN_TOPICS, "p.shop.orders"]
    only = config(streams_file, PIPELINE_STREAMS="orders,events")
    assert kafka.data_topics(only) == ["p.shop.orders", "p.agents.events"]


def test_the_acls_grant_the_catalogs_topics(streams_file: Path) -> None:
    def written(acls: list[object]) -> set[str]:
        return {
            a.name  # type: ignore[attr-defined]
            for a in acls
            if a.principal == "User:pipeline-producer"  # type: ignore[attr-defined]
        }

    assert written(pipeline_acls("p.", "g")) == set(BUILTIN_TOPICS)
    assert written(pipeline_acls("p.", "g", load(streams_file))) == {
        *BUILTIN_TOPICS,
        "p.shop.orders",
    }


def test_the_testbed_makes_the_built_in_topics_unless_given_a_catalog(streams_file: Path) -> None:
    assert testbed.data_topics("p.") == BUILTIN_TOPICS
    assert testbed.data_topics("p.", load(streams_file))[-1] == "p.shop.orders"


def test_an_agent_of_a_user_stream_maps_and_labels_it(streams_file: Path) -> None:
    agent = DatabaseAgent(config(streams_file, PIPELINE_STREAMS="orders,events"))
    assert agent.ownership.stream_of("p.shop.orders") == "orders"
    exposed = generate_latest(agent.metrics.registry).decode()
    assert 'pipeline_stream_topic{stream="orders",topic="p.shop.orders"} 1.0' in exposed
    assert 'pipeline_stream_topic{stream="events",topic="p.agents.events"} 1.0' in exposed
    assert 'stream="metrics"' not in exposed


def test_the_command_line_checks_stream_names_against_the_catalog(streams_file: Path) -> None:
    assert stream_list("orders,events") == ("orders", "events")
    with pytest.raises(argparse.ArgumentTypeError, match="malformed stream name"):
        stream_list("Orders")
    check_streams("--streams", ["orders", "events"], config(streams_file))
    with pytest.raises(ConfigError, match=r"--streams: unknown stream\(s\) orders; choose from"):
        check_streams("--streams", ["orders", "events"], config(None))


def test_replay_and_dead_letters_know_a_catalog_stream(streams_file: Path) -> None:
    catalog = load(streams_file)
    assert parse_streams(["orders,states"], catalog) == ("orders", "states")
    with pytest.raises(ReplayError, match="unknown stream"):
        parse_streams(["orders"], load())
    assert letter_stream(catalog, "p.shop.orders", "p.") == "orders"
    assert letter_stream(load(), "p.shop.orders", "p.") is None


def test_the_typed_records_go_to_the_built_in_streams_in_catalog_order() -> None:
    assert tuple(RECORD_STREAMS.values()) == load().names
    simulator = FleetSimulator(agents=5, users=5, seed=1)
    records = simulator.next_records(500, datetime(2026, 11, 1, tzinfo=UTC))
    assert {stream_of(r) for r in records} == set(load().names)
    for record in records:
        stream = STREAM_BY_NAME[stream_of(record)]
        assert isinstance(record, stream.record_type)
        assert record_key(record) == str(getattr(record, stream.key_field)).encode()
    assert Mix().weights() == (0.10, 0.20, 0.45, 0.20, 0.05)
