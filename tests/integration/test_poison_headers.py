"""Records whose header names are not UTF-8, against the real broker and database.

Kafka's protocol makes a header name UTF-8, but the broker takes any bytes, and aiokafka's
parser raised on them from ``getmany`` (pipeline/aiokafka_compat.py says how): the agent
exited on every start. Here such records sit among good ones, in the same batches; the
DatabaseAgents keep running, every good record lands exactly once, and each bad one is a dead
letter with its coordinates and reason. On the control topic, such a record is a rejected
command, and the command after it is applied.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.control import Ack, control_topics
from pipeline.devstack.processes import choose_port
from pipeline.lag_probe import LagProbe
from pipeline.records import DLQ_TOPIC, JSON, topic_name
from pipeline.testbed import AgentProcess
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import CreateTopic, Servers
from tests.integration.harness import (
    Outgoing,
    Sent,
    agent_env,
    assert_exactly_once,
    create_topics,
    fleet_traffic,
    migrated,
    produce,
    until,
    wait_caught_up,
)
from tests.integration.test_control import (
    Keys,
    controlled_agent,
    envelope_bytes,
    fetch,
    keys,
    live,
    orchestrator,
    status_acks,
)
from tests.raw_headers import RawName, batch_builder

pytestmark = pytest.mark.timeout(400)

__all__ = ["keys"]  # the fixture, used by name

BAD_NAME = b"\xff\xfe"
BAD_REASON = "header name b'\\xff\\xfe' is not UTF-8"


Header = tuple[str, bytes | None]


async def send_batch(
    bootstrap: str,
    topic: str,
    partition: int,
    records: list[tuple[bytes | None, bytes | None, list[Header]]],
    *,
    gzip: bool = False,
) -> int:
    """Send ``records`` (key, value, headers) as one batch to a partition, built by aiokafka's
    pure-Python builder so that a :class:`RawName` goes out as its bytes; return the offset
    of the first."""
    producer = kafka_clients.producer(
        kafka_clients.kafka_settings(bootstrap), acks="all", enable_idempotence=False
    )
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = batch_builder(gzip=gzip)
        for key, value, headers in records:
            assert batch.append(key=key, value=value, timestamp=None, headers=headers) is not None
        delivered = await producer.send_batch(batch, topic, partition=partition)
        return int((await delivered).offset)
    finally:
        await producer.stop()


async def send_poison(bootstrap: str, prefix: str, good: list[Outgoing]) -> list[Sent]:
    """On every partition of the metrics and events topics, one batch of a good record, a
    bad one (a valid record but for its header name), a good one; on partition 2 the batch
    is compressed. Returns where each landed, the bad ones marked as poison."""
    sent: list[Sent] = []
    for stream in (STREAM_BY_NAME["metrics"], STREAM_BY_NAME["events"]):
        mine = [o for o in good if o.stream is stream][:9]
        for partition in range(3):
            before, bad, after = mine[partition * 3 : partition * 3 + 3]
            batch: list[tuple[bytes | None, bytes | None, list[Header]]] = [
                (before.key, before.value, []),
                (bad.key, bad.value, [(RawName(BAD_NAME), b"x"), ("content-type", JSON.encode())]),
                (after.key, after.value, [("content-type", JSON.encode())]),
            ]
            first = await send_batch(
                bootstrap, topic_name(stream.topic, prefix), partition, batch, gzip=partition == 2
            )
            sent += [
                Sent(stream.topic, partition, first, None),
                Sent(stream.topic, partition, first + 1, BAD_REASON),
                Sent(stream.topic, partition, first + 2, None),
            ]
    return sent


async def dlq_records(bootstrap: str, prefix: str) -> list[Any]:
    """Every record on the DLQ topic."""
    topic = topic_name(DLQ_TOPIC, prefix)
    kafka = kafka_clients.kafka_settings(bootstrap)
    ends = {
        TopicPartition(*tp): end for tp, end in (await kafka_io.end_offsets(kafka, [topic])).items()
    }
    consumer = kafka_clients.consumer(kafka)
    await consumer.start()
    try:
        partitions = list(ends)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[Any] = []
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                found += (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
        return found
    finally:
        await kafka_io.stop_consumer(consumer)


def _tails(logs: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(logs.glob("agent-*.log")))


async def test_records_whose_header_names_are_not_utf8_become_dead_letters_and_stop_no_agent(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    traffic = fleet_traffic(8_000, seed=61)
    agents = [
        AgentProcess(
            agent_env(
                bootstrap,
                database_url,
                prefix,
                prefix,
                metrics_address=f"127.0.0.1:{choose_port(0)}",
                instance_id=f"agent-{i}",
            ),
            tmp_path / f"agent-{i}.log",
        ).start()
        for i in range(2)
    ]
    pids = [a.pid for a in agents]

    async def both_running() -> None:
        exited = {a.pid: a.proc.poll() for a in agents if a.proc and a.proc.poll() is not None}
        assert not exited, f"agents exited (pid: code): {exited}\n{_tails(tmp_path)}"

    try:
        sent = await produce(bootstrap, prefix, traffic[:4_000])
        sent += await send_poison(bootstrap, prefix, fleet_traffic(200, seed=62))
        sent += await produce(bootstrap, prefix, traffic[4_000:])
        ends = await wait_caught_up(
            database_url, bootstrap, prefix, prefix, within=180, on_poll=both_running
        )
        await assert_exactly_once(database_url, prefix, prefix, sent, ends)
        await both_running()
        assert [a.pid for a in agents] == pids
    finally:
        for agent in agents:
            agent.stop()

    poison = {(s.topic, s.partition, s.offset) for s in sent if s.poison}
    assert len(poison) == 6
    letters = await fetch(
        database_url,
        "SELECT src_topic, src_partition, src_offset, error_class, reason, record_headers "
        "FROM dead_letters WHERE group_id = $1",
        prefix,
    )
    where = {
        (r["src_topic"].removeprefix(prefix), r["src_partition"], r["src_offset"]) for r in letters
    }
    assert where == poison
    assert Counter((r["error_class"], r["reason"]) for r in letters) == Counter(
        {("InvalidHeader", BAD_REASON): 6}
    )
    # jsonb keeps the name as text, its bytes escaped as header values are.
    assert [json.loads(r["record_headers"]) for r in letters] == 6 * [
        [["\\xff\\xfe", "x"], ["content-type", JSON]]
    ]

    on_dlq = [r for r in await dlq_records(bootstrap, prefix) if r.headers]
    by_source = {}
    for record in on_dlq:
        headers = dict(record.headers)
        source = (
            headers["dlq.source.topic"].decode().removeprefix(prefix),
            int(headers["dlq.source.partition"]),
            int(headers["dlq.source.offset"]),
        )
        by_source[source] = (headers["dlq.error.class"], headers["dlq.reason"].decode())
        assert headers["\\xff\\xfe"] == b"x"
    assert by_source == {source: (b"InvalidHeader", BAD_REASON) for source in poison}


async def test_a_control_record_whose_header_name_is_not_utf8_is_rejected_and_the_next_applied(
    servers: Servers, database_url: str, unique: str, keys: Keys
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    await migrated(database_url)
    ag = orchestrator(bootstrap, prefix, keys)
    control_topic, status_topic = control_topics(prefix)

    async with controlled_agent(bootstrap, database_url, prefix, keys) as agent:
        await live(ag, prefix, 1)
        offsets = [
            await send_batch(bootstrap, control_topic, 0, [(None, command, headers)])
            for command, headers in (
                (envelope_bytes(keys, prefix, 5), []),
                # Signed and valid: only its header name is wrong.
                (envelope_bytes(keys, prefix, 6), [(RawName(BAD_NAME), b"x")]),
                (envelope_bytes(keys, prefix, 7), [("trace", b"1")]),
            )
        ]

        async def all_decided() -> bool:
            rows = await fetch(
                database_url, "SELECT count(*) AS n FROM control_log WHERE direction = 'command'"
            )
            return bool(rows[0]["n"] == 3)

        await until(all_decided, within=60, what="every control record decided")
        counted = Counter(
            {
                s.labels["outcome"]: s.value
                for metric in agent.metrics.registry.collect()
                for s in metric.samples
                if s.name == "pipeline_control_commands_total"
            }
        )

    rows = await fetch(
        database_url,
        "SELECT src_offset, outcome, reason FROM control_log WHERE direction = 'command'",
    )
    assert {r["src_offset"]: (r["outcome"], r["reason"]) for r in rows} == {
        offsets[0]: ("applied", ""),
        offsets[1]: ("rejected", f"undecodable: {BAD_REASON}"),
        offsets[2]: ("applied", ""),
    }
    assert counted == Counter({"applied": 2.0, "rejected": 1.0})
    # An undecodable record is not acknowledged: no command id, so nobody waits for it.
    acks = [a for a in await status_acks(bootstrap, status_topic) if isinstance(a, Ack)]
    assert Counter((a.seq, a.outcome, a.reason, a.detail) for a in acks) == Counter(
        [(5, "applied", "", ""), (7, "applied", "", "")]
    )


async def test_the_other_readers_read_past_such_a_record(
    servers: Servers, create_topic: CreateTopic
) -> None:
    """Every consumer of the project comes from kafka_clients.consumer: `pipeline top`,
    Antigravity's status readers and the replay worker read with ``getmany`` as here; the lag
    probe asks for the timestamp of the record at a stored offset, here the bad one."""
    bootstrap = servers.endpoints.kafka_bootstrap
    topic = await create_topic("poison")
    bad: list[Header] = [(RawName(BAD_NAME), b"x")]
    first = await send_batch(bootstrap, topic, 0, [(b"k", b"a", []), (b"k", b"b", bad)])
    await send_batch(bootstrap, topic, 0, [(b"k", b"c", [])])
    tp = TopicPartition(topic, 0)
    kafka = kafka_clients.kafka_settings(bootstrap)

    consumer = kafka_clients.consumer(kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, first)
        found: list[Any] = []
        while len(found) < 3:
            found += (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
    finally:
        await kafka_io.stop_consumer(consumer)
    assert [(r.offset - first, r.value, r.headers) for r in found] == [
        (0, b"a", ()),
        (1, b"b", (("\udcff\udcfe", b"x"),)),
        (2, b"c", ()),
    ]

    probe = LagProbe(kafka, timeout_s=10)
    try:
        stored = {(topic, 0): first + 1}
        oldest = await probe.oldest_timestamps(stored, await probe.end_offsets(list(stored)))
    finally:
        await probe.stop()
    assert oldest == {(topic, 0): found[1].timestamp}
