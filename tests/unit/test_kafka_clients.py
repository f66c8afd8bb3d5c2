"""The Kafka client factory: what it adds to a client (the connection, nothing else), and the
agent's clients named by the instance id. No broker: clients are built, never started."""

from __future__ import annotations

import msgspec
import pytest
from aiokafka import ConsumerRebalanceListener, TopicPartition

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.config import load_config
from pipeline.kafka_clients import KafkaSettings, kafka_settings

ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka1:9092,kafka2:9092",
    "DATABASE_URL": "postgresql://ingest@db.example:5432/agents",
    "PIPELINE_INSTANCE_ID": "db-agent-7",
}


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass


def test_the_connection_is_the_servers_and_the_client_id() -> None:
    settings = KafkaSettings(bootstrap_servers="k1:9092,k2:9092", client_id="me")
    assert settings.connection() == {"bootstrap_servers": "k1:9092,k2:9092", "client_id": "me"}


def test_no_client_id_leaves_aiokafkas_default() -> None:
    assert KafkaSettings(bootstrap_servers="k:9092").connection() == {"bootstrap_servers": "k:9092"}


def test_bootstrap_servers_alone_make_settings() -> None:
    settings = KafkaSettings(bootstrap_servers="k:9092", client_id="me")
    assert kafka_settings(settings) is settings
    assert kafka_settings("k:9092") == KafkaSettings(bootstrap_servers="k:9092")


def test_settings_decode_strictly() -> None:
    assert msgspec.convert({"bootstrap_servers": "k:1"}, KafkaSettings) == KafkaSettings(
        bootstrap_servers="k:1"
    )
    with pytest.raises(msgspec.ValidationError, match="length >= 1"):
        msgspec.convert({"bootstrap_servers": ""}, KafkaSettings)
    with pytest.raises(msgspec.ValidationError, match="unknown field `ssl`"):
        msgspec.convert({"bootstrap_servers": "k:1", "ssl": True}, KafkaSettings)


@pytest.mark.parametrize(
    "keyword", ["bootstrap_servers", "client_id", "security_protocol", "sasl_plain_password"]
)
async def test_a_client_cannot_bring_its_own_connection(keyword: str) -> None:
    settings = KafkaSettings(bootstrap_servers="k:9092")
    for build in (kafka_clients.consumer, kafka_clients.producer, kafka_clients.admin):
        with pytest.raises(TypeError, match=f"^{keyword}: how to reach Kafka comes from"):
            build(settings, **{keyword: "x"})


async def test_clients_get_the_connection_and_their_own_settings() -> None:
    settings = KafkaSettings(bootstrap_servers="k:9092", client_id="me")
    producer = kafka_clients.producer(settings, acks="all", request_timeout_ms=1234)
    try:
        assert repr(producer.client) == "<AIOKafkaClient client_id=me>"
        assert producer.client.hosts == [("k", 9092, 0)]
        assert producer._request_timeout_ms == 1234
    finally:
        await producer.stop()


async def test_the_agents_consumer_is_named_by_the_instance_id() -> None:
    consumer = kafka_io.make_consumer(load_config(ENV), Listener())
    try:
        assert repr(consumer._client) == "<AIOKafkaClient client_id=db-agent-7>"
        assert sorted(consumer._client.hosts) == [("kafka1", 9092, 0), ("kafka2", 9092, 0)]
    finally:
        await kafka_io.stop_consumer(consumer)
