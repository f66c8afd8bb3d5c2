"""AgentPublisher.publish(stream, value, key=...): any stream of its catalog, each value
checked with the stream's decoder before it is sent. A stand-in producer records what would
go to Kafka (the broker is tests/integration/test_publisher.py's)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.catalog import CatalogError
from pipeline.records import CONTENT_TYPE_HEADER, JSON, MSGPACK, StateChange
from producers.publisher import AgentPublisher, RecordRefused

ORDERS = """
[[streams]]
name = "orders"
topic = "shop.orders"
table = "orders"
mode = "latest"
key = ["order_id"]
version = "revision"
tombstones = "delete"

[streams.columns]
order_id = "uuid"
customer = { type = "text", path = "customer.id" }
amount = "numeric"
status = { type = "text", default = "new" }
revision = "bigint"
region = { type = "text", source = "key" }
"""
ORDER_ID = uuid.UUID("6f1c2a7e-3b4d-4c5e-8f90-a1b2c3d4e5f6")
ORDER = {"order_id": str(ORDER_ID), "customer": {"id": "c-7"}, "amount": "12.50", "revision": 3}


class Sent(msgspec.Struct, frozen=True):
    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]


class FakeProducer:
    """What AgentPublisher asks of aiokafka's producer to send one record."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[Any]:
        self.sent.append(Sent(topic, value, key, list(headers)))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(("metadata", topic, len(self.sent) - 1))
        return future


@pytest.fixture
def streams_file(tmp_path: Path) -> Path:
    path = tmp_path / "streams.toml"
    path.write_text(ORDERS)
    return path


def publisher(catalog: Any, content_type: str = JSON) -> tuple[AgentPublisher, FakeProducer]:
    found = AgentPublisher(
        "127.0.0.1:9", topic_prefix="p.", content_type=content_type, catalog=catalog
    )
    producer = FakeProducer()
    found._producer = producer  # started, as far as sending goes
    return found, producer


def test_a_value_is_published_to_a_user_stream(streams_file: Path) -> None:
    pub, producer = publisher(streams_file)
    asyncio.run(pub.publish("orders", ORDER, key="eu"))
    assert producer.sent == [
        Sent(
            "p.shop.orders",
            msgspec.json.encode(ORDER),
            b"eu",
            [(CONTENT_TYPE_HEADER, b"application/json")],
        )
    ]
    assert pub.topic("orders") == "p.shop.orders"


def test_a_value_is_encoded_as_the_publishers_content_type(streams_file: Path) -> None:
    pub, producer = publisher(streams_file, MSGPACK)
    value = {**ORDER, "order_id": ORDER_ID, "amount": Decimal("12.50")}
    asyncio.run(pub.publish("orders", value, key=b"eu"))
    [sent] = producer.sent
    assert msgspec.msgpack.decode(sent.value) == {**ORDER, "amount": "12.50"}
    assert sent.headers == [(CONTENT_TYPE_HEADER, b"application/msgpack")]


def test_a_tombstone_is_published_to_a_stream_that_deletes(streams_file: Path) -> None:
    pub, producer = publisher(streams_file)
    asyncio.run(pub.publish("orders", None, key=str(ORDER_ID)))
    assert [(s.topic, s.value, s.key) for s in producer.sent] == [
        ("p.shop.orders", None, str(ORDER_ID).encode())
    ]


@pytest.mark.parametrize(
    ("value", "column"),
    [
        pytest.param({**ORDER, "amount": "lots"}, "amount", id="not-a-number"),
        pytest.param({**ORDER, "order_id": "order-1"}, "order_id", id="not-a-uuid"),
        pytest.param({k: v for k, v in ORDER.items() if k != "revision"}, "revision", id="missing"),
        pytest.param({**ORDER, "revision": 2**63}, "revision", id="out-of-range"),
        pytest.param({**ORDER, "customer": {"id": 7}}, "customer", id="nested-wrong-type"),
    ],
)
def test_a_value_the_stream_refuses_is_not_sent(
    streams_file: Path, value: dict[str, Any], column: str
) -> None:
    pub, producer = publisher(streams_file)
    with pytest.raises(RecordRefused, match=f"stream 'orders', column {column}: ") as refused:
        asyncio.run(pub.publish("orders", value, key="eu"))
    assert refused.value.stream == "orders"
    assert not refused.value.retriable
    assert producer.sent == []


def test_a_value_that_cannot_be_encoded_is_refused(streams_file: Path) -> None:
    pub, producer = publisher(streams_file)
    with pytest.raises(RecordRefused, match="stream 'orders': the value cannot be encoded"):
        asyncio.run(pub.publish("orders", {**ORDER, "amount": object()}, key="eu"))
    assert producer.sent == []


def test_an_unknown_stream_is_refused_naming_the_catalogs_streams(streams_file: Path) -> None:
    pub, producer = publisher(streams_file)
    with pytest.raises(RecordRefused, match=r"unknown stream 'refunds': .* has states, .*, orders"):
        asyncio.run(pub.publish("refunds", ORDER, key="eu"))
    assert producer.sent == []


def test_the_default_catalog_is_the_built_in_streams() -> None:
    pub, producer = publisher(None)
    with pytest.raises(RecordRefused, match="unknown stream 'orders'"):
        asyncio.run(pub.publish("orders", ORDER, key="eu"))
    metric = {"agent_id": "a-1", "name": "cpu", "value": 0.5, "ts": "2026-11-01T00:00:00Z"}
    asyncio.run(pub.publish("metrics", metric, key="a-1"))
    assert [(s.topic, s.key) for s in producer.sent] == [("p.agents.metrics", b"a-1")]
    with pytest.raises(RecordRefused, match="stream 'metrics', column ts: "):
        asyncio.run(pub.publish("metrics", {**metric, "ts": "2026-11-01T00:00:00"}, key="a-1"))
    assert len(producer.sent) == 1


def test_the_typed_records_go_to_the_built_in_streams(streams_file: Path) -> None:
    pub, producer = publisher(streams_file)
    record = StateChange(agent_id="a-1", state="up", version=1, ts=_ts())
    asyncio.run(pub.publish(record))
    asyncio.run(pub.state(agent_id="a-2", state="down", version=2, ts=_ts()))
    assert [(s.topic, s.key) for s in producer.sent] == [
        ("p.agents.states", b"a-1"),
        ("p.agents.states", b"a-2"),
    ]
    with pytest.raises(TypeError, match="typed record alone"):
        asyncio.run(pub.publish(record, key="x"))


def test_a_catalog_without_the_built_in_streams_refuses_the_typed_records(tmp_path: Path) -> None:
    path = tmp_path / "only-orders.toml"
    path.write_text("builtin = false\n" + ORDERS)
    pub, producer = publisher(path)
    with pytest.raises(RecordRefused, match="unknown stream 'states'"):
        asyncio.run(pub.state(agent_id="a-1", state="up", version=1, ts=_ts()))
    assert producer.sent == []


def test_a_bad_streams_file_fails_when_the_publisher_is_made(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[streams]]\nname = "Orders"\n')
    with pytest.raises(CatalogError, match=str(path)):
        AgentPublisher("127.0.0.1:9", catalog=path)


def _ts() -> datetime:
    return datetime(2026, 11, 1, tzinfo=UTC)
