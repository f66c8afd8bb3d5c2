"""The producer SDK against the real broker: what is sent is exactly what is stored."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka.admin import NewTopic
from aiokafka.structs import ConsumerRecord, TopicPartition

from pipeline import kafka_clients
from pipeline.devstack import Endpoints, kafka, kafka_versions
from pipeline.devstack.processes import choose_port, stop_pid
from pipeline.devstack.stack import cache_root
from pipeline.errors import ConfigError
from pipeline.records import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    AgentEvent,
    Metric,
    Record,
    topic_name,
)
from producers.log_handler import KafkaLogHandler
from producers.publisher import AgentPublisher, PublishError, PublishTimeoutError
from producers.simulator import FleetSimulator, simulate
from tests.builtin_streams import STREAM_BY_NAME, STREAM_BY_TYPE, STREAMS, Stream
from tests.conftest import CreateTopic

_DECODERS: dict[str, dict[str, msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]]] = {
    JSON: {s.name: msgspec.json.Decoder(s.record_type) for s in STREAMS},
    MSGPACK: {s.name: msgspec.msgpack.Decoder(s.record_type) for s in STREAMS},
}
# How late a loaded machine (two cores shared with other test workers) may run a deadline of
# this process. The bounds checked against it replace aiokafka's own waits, which last 40 s
# or for ever, so even this margin tells the two apart.
LATE = 5.0
TICK = 0.05  # the simulator's pacing interval in these tests


async def _stream_topics(create_topic: CreateTopic, partitions: int) -> dict[str, str]:
    return {s.name: await create_topic(s.topic, partitions=partitions) for s in STREAMS}


async def _consume_all(
    bootstrap: str, topics: list[str], partitions: int
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record in ``topics`` (``partitions`` each), read to the end offsets: all of them."""
    consumer = kafka_clients.consumer(
        kafka_clients.kafka_settings(bootstrap),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for topic in topics for p in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        received: list[ConsumerRecord[bytes, bytes]] = []
        while any([await consumer.position(tp) < ends[tp] for tp in assigned]):
            batches = await consumer.getmany(timeout_ms=10_000)
            assert batches, f"no records for 10 s after {len(received)} of {sum(ends.values())}"
            for records in batches.values():
                received.extend(records)
        assert len(received) == sum(ends.values())
        return received
    finally:
        await consumer.stop()


def _decoded(message: ConsumerRecord[bytes, bytes], stream: Stream) -> tuple[str, Record]:
    headers = dict(message.headers)
    content_type = headers[CONTENT_TYPE_HEADER].decode()
    assert message.value is not None
    return content_type, _DECODERS[content_type][stream.name].decode(message.value)


def _stream_of(topic: str, topics: dict[str, str]) -> Stream:
    return STREAM_BY_NAME[next(name for name, t in topics.items() if t == topic)]


@pytest.fixture
def refused_address() -> Iterator[str]:
    """A 127.0.0.1 port bound but not listening: connections are refused, and nothing else
    can take the port while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_every_stream_round_trips_in_json_and_msgpack(
    endpoints: Endpoints, create_topic: CreateTopic, unique: str
) -> None:
    topics = await _stream_topics(create_topic, partitions=3)
    prefix = f"{unique}."
    base = datetime(2025, 6, 1, tzinfo=UTC)
    # Sent one after another, so each key's records sit in its partition in sending order.
    sent: list[tuple[str, Record]] = []

    async with AgentPublisher(endpoints.kafka_bootstrap, topic_prefix=prefix) as publisher:
        for i in range(20):
            agent = f"agent-{i % 4}"
            ts = base + timedelta(seconds=i)
            sent += [
                (JSON, await publisher.state(agent_id=agent, state="busy", version=i, ts=ts)),
                (
                    JSON,
                    await publisher.event(agent_id=agent, kind="task_started", payload={"i": i}),
                ),
                (JSON, await publisher.metric(agent_id=agent, name="cpu_percent", value=i / 3)),
                (JSON, await publisher.analytics(user_id=f"user-{i % 5}", action="click")),
                (JSON, await publisher.config(key=f"k{i % 3}", value=[i, "x"], version=i)),
            ]
        for record in FleetSimulator(agents=7, seed=1).next_records(100, base):
            metadata = await publisher.publish(record)
            assert metadata.topic == topics[STREAM_BY_TYPE[type(record)].name]
            sent.append((JSON, record))

    async with AgentPublisher(
        endpoints.kafka_bootstrap, topic_prefix=prefix, content_type=MSGPACK
    ) as publisher:
        records = FleetSimulator(agents=7, seed=2).next_records(150, base)
        await publisher.delivered(await publisher.send_many(records))
        sent += [(MSGPACK, r) for r in records]

    expected: dict[tuple[str, bytes], list[tuple[str, Record]]] = collections.defaultdict(list)
    for content_type, record in sent:
        stream = STREAM_BY_TYPE[type(record)]
        expected[topics[stream.name], stream.key(record)].append((content_type, record))

    messages = await _consume_all(endpoints.kafka_bootstrap, list(topics.values()), 3)
    assert len(messages) == len(sent) == 350
    received: dict[tuple[str, bytes], list[tuple[str, Record]]] = collections.defaultdict(list)
    for message in sorted(messages, key=lambda m: (m.topic, m.partition, m.offset)):
        assert message.key is not None
        received[message.topic, message.key].append(
            _decoded(message, _stream_of(message.topic, topics))
        )
    assert received == expected
    assert {ct for ct, _ in sent} == {JSON, MSGPACK}


async def test_send_nowait_acknowledges_in_bulk(
    endpoints: Endpoints, create_topic: CreateTopic, unique: str
) -> None:
    topic = await create_topic("agents.metrics", partitions=1)
    now = datetime.now(UTC)
    async with AgentPublisher(endpoints.kafka_bootstrap, topic_prefix=f"{unique}.") as publisher:
        futures = [
            await publisher.send_nowait(
                Metric(agent_id="agent-1", name="latency_ms", value=float(i), ts=now)
            )
            for i in range(2000)
        ]
        metadata = await publisher.delivered(futures)
        await publisher.flush()
    assert [(m.topic, m.partition, m.offset) for m in metadata] == [
        (topic, 0, i) for i in range(2000)
    ]


async def test_log_handler_delivers_exactly_the_records_logged(
    endpoints: Endpoints, create_topic: CreateTopic, unique: str
) -> None:
    topic = await create_topic("agents.events", partitions=2)
    handler = KafkaLogHandler(
        endpoints.kafka_bootstrap, agent_id="agent-log", topic_prefix=f"{unique}."
    )
    log = logging.getLogger(f"tests.publisher.{unique}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    try:
        for i in range(250):
            log.log(levels[i % 5], "message %d", i)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed %s", "hard")
    finally:
        log.removeHandler(handler)
        # close() blocks while the queue drains: keep it off this test's event loop.
        await asyncio.to_thread(handler.close, 30)
    assert (handler.delivered, handler.failed, handler.dropped) == (251, 0, 0)

    messages = await _consume_all(endpoints.kafka_bootstrap, [topic], 2)
    assert len(messages) == 251
    assert {m.key for m in messages} == {b"agent-log"}  # one key: one partition, in order
    assert {dict(m.headers)[CONTENT_TYPE_HEADER] for m in messages} == {JSON.encode()}
    events = [msgspec.json.decode(m.value or b"", type=AgentEvent) for m in messages]
    assert {e.kind for e in events} == {"log"}
    assert [e.payload["message"] for e in events] == [f"message {i}" for i in range(250)] + [
        "failed hard"
    ]
    assert [e.severity for e in events[:5]] == ["debug", "info", "warning", "error", "critical"]
    assert "RuntimeError: boom" in events[-1].payload["exc"]
    assert len({e.event_id for e in events}) == 251


async def test_simulate_delivers_exactly_what_it_reports(
    endpoints: Endpoints, create_topic: CreateTopic, unique: str
) -> None:
    topics = await _stream_topics(create_topic, partitions=3)
    result = await simulate(
        endpoints.kafka_bootstrap,
        agents=20,
        rate=3000,
        duration=1.0,
        topic_prefix=f"{unique}.",
        seed=42,
        record_sent=True,
        tick=TICK,
    )
    assert result.total == sum(result.counts.values()) == len(result.sent)
    assert all(result.counts[s.name] > 0 for s in STREAMS)
    # It sends the 3000 due unless its second ran out first, as a loaded machine's may (how
    # far below the target that leaves it is not the simulator's to promise); and its pacing
    # never runs ahead of the schedule: a tick queues only what is due by the tick's end.
    assert result.total == 3000 or (result.total < 3000 and result.elapsed >= 1.0), result
    assert result.total <= result.target_rate * (result.elapsed + TICK), result

    messages = await _consume_all(endpoints.kafka_bootstrap, list(topics.values()), 3)
    assert len(messages) == result.total
    by_coordinates = {(s.topic, s.partition, s.offset): s for s in result.sent}
    assert len(by_coordinates) == result.total
    consumed_per_stream: collections.Counter[str] = collections.Counter()
    for message in messages:
        sent = by_coordinates[message.topic, message.partition, message.offset]
        stream = _stream_of(message.topic, topics)
        assert message.key == sent.key == stream.key(sent.record)
        assert _decoded(message, stream) == (JSON, sent.record)
        consumed_per_stream[stream.name] += 1
    assert dict(consumed_per_stream) == result.counts


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"content_type": "text/plain"}, "content_type"),
        ({"content_type": "application/JSON"}, "content_type"),
        ({"send_timeout": 0}, "send_timeout"),
        ({"send_timeout": float("nan")}, "send_timeout"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_field(
    settings: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        AgentPublisher("127.0.0.1:1", **settings)


async def test_only_wire_records_are_sent(endpoints: Endpoints) -> None:
    async with AgentPublisher(endpoints.kafka_bootstrap, send_timeout=5) as publisher:
        with pytest.raises(TypeError, match="not a wire record: dict"):
            await publisher.send({"agent_id": "a"})  # type: ignore[arg-type]
    with pytest.raises(PublishError, match="not started"):
        await publisher.send_nowait(Metric(agent_id="a", name="n", value=1, ts=datetime.now(UTC)))


async def test_a_missing_topic_times_out_naming_it(endpoints: Endpoints, unique: str) -> None:
    prefix = f"{unique}.never-created."
    async with AgentPublisher(
        endpoints.kafka_bootstrap, topic_prefix=prefix, send_timeout=2
    ) as publisher:
        for send in (publisher.send, publisher.send_nowait):
            record = AgentEvent(event_id=uuid.uuid4(), agent_id="a", kind="k", ts=datetime.now(UTC))
            started = time.monotonic()
            with pytest.raises(PublishTimeoutError) as raised:
                await send(record)
            assert 1.9 <= time.monotonic() - started < 2 + LATE
            assert raised.value.topic == topic_name("agents.events", prefix)
            assert topic_name("agents.events", prefix) in str(raised.value)


async def test_an_unreachable_broker_times_out(refused_address: str) -> None:
    publisher = AgentPublisher(refused_address, send_timeout=2)
    started = time.monotonic()
    with pytest.raises(PublishTimeoutError, match=refused_address):
        async with publisher:
            pass
    assert 1.9 <= time.monotonic() - started < 2 + LATE
    assert not publisher.started


async def test_the_log_handler_accounts_for_every_record_when_kafka_is_unreachable(
    refused_address: str,
) -> None:
    handler = KafkaLogHandler(refused_address, agent_id="a", maxsize=50, send_timeout=0.5)
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "lost", None, None)
    started = time.perf_counter()
    for _ in range(80):
        handler.handle(record)
    # handle() never waits for room in the queue: waiting, it would wait for the worker's
    # failed sends, each as long as send_timeout (0.5 s), for 30 records.
    assert time.perf_counter() - started < 0.5 + LATE
    await asyncio.to_thread(handler.close, 10)
    # How many the worker took before the queue filled depends on thread timing; that every
    # record is counted exactly once, as failed or dropped, does not.
    assert handler.delivered == 0
    assert handler.dropped >= 1
    assert handler.failed + handler.dropped == 80


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """A broker of this test's own (bootstrap, pid), so the test may freeze it."""
    monkeypatch.setenv("KAFKA_HEAP_OPTS", "-Xms128m -Xmx384m")
    # The release this session runs (PIPELINE_DEV_KAFKA), as the session's stack does.
    release = kafka_versions.release(kafka_versions.chosen(os.environ))
    broker = kafka.KafkaBroker(
        tmp_path / "kafka", kafka.resolve_jars(cache_root(), release), release
    )
    port = choose_port(0)
    pid = broker.start(port, choose_port(0, taken={port}))
    try:
        broker.wait_ready(f"127.0.0.1:{port}", timeout=90)
        yield f"127.0.0.1:{port}", pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        stop_pid(pid, signal.SIGTERM, timeout=30)


async def test_a_frozen_broker_bounds_every_call_and_stop_still_closes(
    own_broker: tuple[str, int],
) -> None:
    """The idempotent producer retries forever and its stop() waits for every batch
    (aio-libs/aiokafka#1101): with the broker frozen (SIGSTOP: connections stay open, nothing
    answers), each call must still return at its bound and stop() must release everything."""
    bootstrap, pid = own_broker
    admin = kafka_clients.admin(kafka_clients.kafka_settings(bootstrap))
    await admin.start()
    try:
        await admin.create_topics([NewTopic("agents.metrics", 1, replication_factor=1)])
    finally:
        await admin.close()
    now = datetime.now(UTC)
    records = [Metric(agent_id="a", name="n", value=float(i), ts=now) for i in range(60)]

    publisher = AgentPublisher(bootstrap, send_timeout=2)
    await publisher.start()
    assert (await publisher.send(records[0])).offset == 0
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(PublishTimeoutError):
            await publisher.send(records[1])
        assert time.monotonic() - started < 3 + LATE

        futures = [await publisher.send_nowait(r) for r in records[2:]]
        started = time.monotonic()
        with pytest.raises(PublishTimeoutError):
            await publisher.delivered(futures)
        assert time.monotonic() - started < 3 + LATE

        pending = [await publisher.send_nowait(r) for r in records[2:12]]
        started = time.monotonic()
        with pytest.raises(PublishTimeoutError, match="stop"):
            await publisher.stop()
        assert time.monotonic() - started < 4 + LATE
        # Nothing is left waiting: the futures failed, and aiokafka's tasks are gone.
        assert all(isinstance(f.exception(), PublishTimeoutError) for f in pending)
        assert [t for t in asyncio.all_tasks() if "aiokafka" in repr(t.get_coro())] == []
        with pytest.raises(PublishError, match="not started"):
            await publisher.send(records[0])
    finally:
        os.kill(pid, signal.SIGCONT)

    # The broker is back: a new publisher works. Records 1 (in flight when the broker froze)
    # may or may not have been written: a timeout means "outcome unknown".
    async with AgentPublisher(bootstrap, send_timeout=30) as again:
        assert (await again.send(records[0])).offset in (1, 2)
