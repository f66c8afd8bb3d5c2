"""The ground floor: records go through the real broker and rows through the real server."""

from __future__ import annotations

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.devstack import Endpoints
from tests.conftest import CreateTopic


async def test_records_produced_are_consumed_back(
    endpoints: Endpoints, create_topic: CreateTopic, unique: str
) -> None:
    topic = await create_topic(partitions=3)
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(500)}
    producer = AIOKafkaProducer(
        bootstrap_servers=endpoints.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for key, value in sent.items():
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=endpoints.kafka_bootstrap,
        group_id=unique,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: dict[bytes, bytes] = {}
    try:
        while len(received) < len(sent):
            batches = await consumer.getmany(timeout_ms=10_000)
            assert batches, f"no records for 10 s after {len(received)} of {len(sent)}"
            for records in batches.values():
                for record in records:
                    assert record.key is not None and record.value is not None
                    received[record.key] = record.value
    finally:
        await consumer.stop()
    assert received == sent


async def test_rows_copied_are_read_back(database_url: str) -> None:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, body jsonb NOT NULL)")
        rows = [(i, f'{{"n": {i}}}') for i in range(1000)]
        await conn.copy_records_to_table("t", records=rows)
        count, total = await conn.fetchrow("SELECT count(*), sum((body->>'n')::int) FROM t")
        assert (count, total) == (1000, sum(range(1000)))
    finally:
        await conn.close()
