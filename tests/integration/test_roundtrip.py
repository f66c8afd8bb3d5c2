"""The ground floor: records go through the real broker and rows through the real server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import msgspec

from pipeline import db, kafka_clients
from pipeline.devstack import Endpoints
from tests.conftest import CreateTopic


async def test_records_produced_are_consumed_back(
    endpoints: Endpoints, create_topic: CreateTopic, unique: str
) -> None:
    topic = await create_topic(partitions=3)
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(500)}
    producer = kafka_clients.producer(endpoints.kafka, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in sent.items():
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = kafka_clients.consumer(
        endpoints.kafka,
        topic,
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


async def test_a_migration_commits_durably_on_an_ingest_connection(database_url: str) -> None:
    """Batches commit with synchronous_commit off (Kafka redelivers what a crash loses, offsets
    and rows together); a migration keeps it on, since nothing would apply it again."""
    session = db.Session(command_timeout=10, idle_in_transaction_timeout=60)
    conn = await db.connect(database_url, session)
    try:
        seen = "CREATE TABLE seen AS SELECT current_setting('synchronous_commit') AS value"
        applied = await db.migrate(conn, [db.Migration(900, "900_seen.sql", seen)])
        assert applied == ["900_seen.sql"]
        assert await conn.fetchval("SELECT value FROM seen") == "on"
        async with db.transaction(conn):  # a batch's transaction, for contrast
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
    finally:
        await conn.close()


async def test_the_ingest_connection_writes_timestamps_and_json_exactly(database_url: str) -> None:
    """db.connect's own codecs (jsonb from raw bytes, timestamptz from microseconds) against
    what PostgreSQL and a plain asyncpg connection make of the same values."""
    instants = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 24, 9, 15, 0, 1, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ]
    texts = [
        "0001-01-01 00:00:00+00",
        "1999-12-31 23:59:59.999999+00",
        "2000-01-01 00:00:00+00",
        "2026-11-24 16:45:00.000001+00",
        "9999-12-31 23:59:59.999999+00",
    ]
    ingest = await db.connect(database_url, db.Session(command_timeout=10))
    plain = await asyncpg.connect(database_url, timeout=10)
    try:
        await plain.execute("SET TIME ZONE 'UTC'")
        await ingest.execute("CREATE TABLE t (id int, ts timestamptz, body jsonb)")
        await ingest.copy_records_to_table(
            "t", records=[(i, ts, msgspec.Raw(b'{"i": %d}' % i)) for i, ts in enumerate(instants)]
        )
        stored = await plain.fetch(
            "SELECT ts::text AS text, ts, body->>'i' AS i FROM t ORDER BY id"
        )
        assert [r["text"] for r in stored] == texts
        assert [r["ts"] for r in stored] == instants
        assert [r["i"] for r in stored] == [str(i) for i in range(len(instants))]
        read_back = await ingest.fetch(
            "SELECT ts FROM t UNION ALL SELECT 'infinity' UNION ALL SELECT '-infinity'"
        )
        assert [r["ts"] for r in read_back] == [
            *instants,
            datetime.max.replace(tzinfo=UTC),
            datetime.min.replace(tzinfo=UTC),
        ]
    finally:
        await plain.close()
        await ingest.close()
