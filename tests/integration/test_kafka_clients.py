"""The DatabaseAgent's Kafka clients, as the broker sees them: named by the instance id."""

from __future__ import annotations

import os
import socket
import time

from aiokafka import ConsumerRebalanceListener, TopicPartition

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.config import load_config
from pipeline.devstack import Endpoints


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass


async def test_the_agents_clients_use_the_instance_id_as_client_id(
    endpoints: Endpoints, unique: str
) -> None:
    config = load_config(
        {
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            "DATABASE_URL": endpoints.database_url,
            "PIPELINE_TOPIC_PREFIX": f"{unique}.",
            "PIPELINE_GROUP_ID": unique,
            "PIPELINE_STREAMS": "metrics",
        }
    )
    assert config.instance_id == f"{socket.gethostname()}-{os.getpid()}"
    assert await kafka_io.ensure_topics(config.kafka, kafka_io.data_topics(config), 1) == [
        f"{unique}.agents.metrics"
    ]

    consumer = kafka_io.make_consumer(config, Listener())
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        while not consumer.assignment():  # joined the group and got its partition
            assert time.monotonic() < deadline, "the consumer was assigned nothing in 60 s"
            await consumer.getmany(timeout_ms=200)
        admin = kafka_clients.admin(config.kafka)
        await admin.start()
        try:
            (response,) = await admin.describe_consumer_groups([unique])
        finally:
            await admin.close()
        (group,) = response.to_object()["groups"]
        assert [m["client_id"] for m in group["members"]] == [config.instance_id]
    finally:
        await kafka_io.stop_consumer(consumer)

    producer = await kafka_io.start_dead_letter_producer(config, kafka_io.PRODUCER_MAX_REQUEST_SIZE)
    try:
        assert repr(producer.client) == f"<AIOKafkaClient client_id={config.instance_id}>"
    finally:
        await producer.stop()
