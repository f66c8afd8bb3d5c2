"""What a DatabaseAgent shows on its metrics address, scraped over HTTP from real agents on
real Kafka and PostgreSQL (docs/observability.md): lag in records and seconds that keeps being
measured while a stream is switched off or the database is blocked, and clears once the
records land; freshness and the end-to-end latency histogram against what was sent; /healthz,
/readyz with its reasons, pipeline_ready and pipeline_build_info."""

from __future__ import annotations

import asyncio
import platform
import random
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumers.agent import DatabaseAgent
from pipeline import kafka_clients
from pipeline.devstack.processes import choose_port
from pipeline.kafka_clients import KafkaSettings
from pipeline.metrics import build_version
from pipeline.records import topic_name
from tests.builtin_streams import STREAM_BY_NAME, STREAMS
from tests.conftest import Servers
from tests.integration.harness import (
    AgentProcess,
    Outgoing,
    agent_env,
    claimed,
    create_topics,
    end_offsets,
    fleet_traffic,
    migrated,
    running_agent,
    stored_offsets,
    until,
    wait_caught_up,
)

pytestmark = pytest.mark.timeout(600)

REFRESH_S = 1.0  # PIPELINE_LAG_REFRESH_S for these agents
# How late a lag value may be when it is scraped: a refresh interval, plus the refresh's own
# lookups on a machine busy with other tests.
STALE_S = REFRESH_S + 3.0
STREAM_OF_TOPIC = {s.topic: s.name for s in STREAMS}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Partition = tuple[str, int]


# -- helpers ----------------------------------------------------------------------------------


def _get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(address: str, path: str) -> tuple[int, str]:
    """GET over HTTP, in a thread: the agent under test may share this event loop."""
    return await asyncio.to_thread(_get, address, path)


async def scrape(address: str) -> Samples:
    status, text = await get(address, "/metrics")
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def per_partition(samples: Samples, name: str, prefix: str) -> dict[Partition, float]:
    """One per-partition series, keyed by (default topic name, partition)."""
    found = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            label = dict(labels)
            found[(label["topic"].removeprefix(prefix), int(label["partition"]))] = value
    return found


def per_stream(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["stream"]: v for (sample, labels), v in samples.items() if sample == name}


@dataclass(frozen=True)
class Landed:
    """Where a record sent landed, and the Kafka timestamp it was sent with."""

    topic: str  # the default name (no prefix)
    partition: int
    offset: int
    timestamp_ms: int


async def send(bootstrap: str, prefix: str, outgoing: list[Outgoing], *, seed: int) -> list[Landed]:
    """Send (acks=all) with explicit timestamps, up to 3 s in the past, out of order.

    Explicit, because aiokafka's RecordMetadata gives every record of a produced batch the
    first record's CreateTime timestamp (producer/message_accumulator.py, MessageBatch.done)."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    stamps = [now_ms - rng.randrange(3000) for _ in outgoing]
    producer = kafka_clients.producer(
        KafkaSettings(bootstrap_servers=bootstrap), acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic_name(o.stream.topic, prefix),
                o.value,
                key=o.key,
                headers=list(o.headers),
                timestamp_ms=stamp,
            )
            for o, stamp in zip(outgoing, stamps, strict=True)
        ]
        acked = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [
        Landed(meta.topic.removeprefix(prefix), meta.partition, meta.offset, stamp)
        for meta, stamp in zip(acked, stamps, strict=True)
    ]


def oldest_by_partition(sent: list[Landed]) -> dict[Partition, int]:
    """The timestamp (ms) of the lowest offset sent to each partition: the oldest record not
    yet written, once everything before it is."""
    first: dict[Partition, Landed] = {}
    for landed in sent:
        key = (landed.topic, landed.partition)
        if key not in first or landed.offset < first[key].offset:
            first[key] = landed
    return {key: landed.timestamp_ms for key, landed in first.items()}


def free_address() -> str:
    return f"127.0.0.1:{choose_port(0)}"


@contextmanager
def serving(agent: DatabaseAgent, address: str) -> Iterator[None]:
    """The agent's endpoints, as `pipeline run` serves them."""
    agent.metrics.serve(address, readiness=agent.readiness)
    try:
        yield
    finally:
        agent.metrics.close()


async def lag_waits_exactly(
    address: str, prefix: str, waiting: dict[Partition, int], oldest: dict[Partition, int]
) -> None:
    """Lag in records is exactly what waits, and lag in seconds is the age of the oldest
    record waiting in each partition, as of a refresh at most STALE_S before the scrape; over
    a few seconds it grows with the clock."""

    async def measured() -> bool:
        samples = await scrape(address)
        records = per_partition(samples, "pipeline_consumer_lag_records", prefix)
        seconds = per_partition(samples, "pipeline_consumer_lag_seconds", prefix)
        return all(records.get(p) == n and seconds.get(p, 0) > 0 for p, n in waiting.items())

    await until(measured, within=60, what=f"lag measured for {sorted(waiting)}")

    async def sample() -> tuple[float, dict[Partition, float], float]:
        before = time.time()
        samples = await scrape(address)
        after = time.time()
        records = per_partition(samples, "pipeline_consumer_lag_records", prefix)
        assert {p: records[p] for p in waiting} == waiting
        seconds = per_partition(samples, "pipeline_consumer_lag_seconds", prefix)
        for partition in waiting:
            age_before = before - oldest[partition] / 1000
            age_after = after - oldest[partition] / 1000
            assert age_before - STALE_S <= seconds[partition] <= age_after + 0.01, (
                partition,
                seconds[partition],
                age_before,
            )
        return before, {p: seconds[p] for p in waiting}, after

    first_at, first, _ = await sample()
    await until(
        lambda: _grown(address, prefix, first, 3.0),
        within=30,
        what="lag in seconds growing while the records wait",
    )
    second_at, second, _ = await sample()
    for partition in waiting:
        grown = second[partition] - first[partition]
        assert abs(grown - (second_at - first_at)) <= STALE_S, (partition, grown)


async def _grown(address: str, prefix: str, first: dict[Partition, float], by: float) -> bool:
    seconds = per_partition(await scrape(address), "pipeline_consumer_lag_seconds", prefix)
    return all(seconds[p] >= s + by for p, s in first.items() if p in seconds)


async def lag_cleared(address: str, prefix: str, ends: dict[Partition, int]) -> None:
    """Every partition: lag 0 in records and seconds; stored and end offsets are the ends."""

    async def cleared() -> bool:
        samples = await scrape(address)
        return all(
            per_partition(samples, name, prefix) == {p: 0 for p in ends}
            for name in ("pipeline_consumer_lag_records", "pipeline_consumer_lag_seconds")
        )

    await until(cleared, within=30, what="lag 0 in records and seconds everywhere")
    samples = await scrape(address)
    assert per_partition(samples, "pipeline_partition_stored_offset", prefix) == ends
    assert per_partition(samples, "pipeline_partition_end_offset", prefix) == ends


async def readyz(address: str) -> tuple[int, str]:
    status, text = await get(address, "/readyz")
    return status, text


async def is_ready(address: str) -> bool:
    return await readyz(address) == (200, "ready")


async def ready_gauge(address: str) -> float:
    return (await scrape(address))[("pipeline_ready", frozenset())]


# -- tests ------------------------------------------------------------------------------------


async def test_lag_grows_while_a_stream_is_switched_off_and_clears_once_its_records_land(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    address = free_address()
    traffic = fleet_traffic(3_000, seed=61)
    events = [o for o in fleet_traffic(2_000, seed=62) if o.stream.name == "events"]

    async with running_agent(bootstrap, database_url, prefix, lag_refresh_s=REFRESH_S) as agent:
        with serving(agent, address):
            sent = await send(bootstrap, prefix, traffic, seed=1)
            await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
            await until(lambda: is_ready(address), within=30, what="ready")

            await agent.deactivate(["events"])
            stored = await stored_offsets(database_url, prefix, prefix)
            waiting_sent = await send(bootstrap, prefix, events, seed=2)
            sent += waiting_sent
            ends = await end_offsets(bootstrap, prefix)
            waiting = {p: e - stored[p] for p, e in ends.items() if e > stored[p]}
            events_topic = STREAM_BY_NAME["events"].topic
            assert {p for p, _ in waiting} == {events_topic}
            assert sum(waiting.values()) == len(events)
            await lag_waits_exactly(address, prefix, waiting, oldest_by_partition(waiting_sent))
            # A stream switched off on purpose leaves the agent ready.
            assert await readyz(address) == (200, "ready")
            assert await ready_gauge(address) == 1
            seconds = per_partition(await scrape(address), "pipeline_consumer_lag_seconds", prefix)
            assert agent.snapshot().lag_seconds == pytest.approx(max(seconds.values()), abs=STALE_S)
            assert agent.snapshot().lag == sum(waiting.values())

            await agent.activate(["events"])
            ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
            await lag_cleared(address, prefix, ends)
            samples = await scrape(address)

    newest: dict[str, float] = defaultdict(float)
    count: Counter[str] = Counter()
    for landed in sent:
        stream = STREAM_OF_TOPIC[landed.topic]
        newest[stream] = max(newest[stream], landed.timestamp_ms / 1000)
        count[stream] += 1
    assert per_stream(samples, "pipeline_newest_record_timestamp_seconds") == newest
    assert per_stream(samples, "pipeline_end_to_end_latency_seconds_count") == count
    for stream, n in count.items():
        labels = frozenset({("stream", stream), ("le", "+Inf")})
        assert samples[("pipeline_end_to_end_latency_seconds_bucket", labels)] == n
        assert (
            samples[
                ("pipeline_end_to_end_latency_seconds_sum", frozenset(labels - {("le", "+Inf")}))
            ]
            > 0
        )
    phases = {
        dict(labels)["phase"]: v
        for (name, labels), v in samples.items()
        if name == "pipeline_batch_phase_seconds_count"
    }
    batches = samples[("pipeline_batches_total", frozenset())]
    assert phases == {"fetch_decode": batches, "write": batches, "commit": batches}


async def test_readyz_names_a_stopped_stream_and_a_blocked_database_and_lag_moves_meanwhile(
    servers: Servers, database_url: str, unique: str
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    address = free_address()
    settings = {"lag_refresh_s": REFRESH_S, "db_command_timeout_s": 2, "retry_max_backoff_s": 1}

    async with running_agent(bootstrap, database_url, prefix, **settings) as agent:
        # A bad deploy under the running agent (at start it would refuse the table and exit).
        await until(lambda: claimed(database_url, prefix), within=60, what="the agent started")
        await migrated(database_url, "ALTER TABLE user_analytics DROP COLUMN properties")
        with serving(agent, address):
            await send(bootstrap, prefix, fleet_traffic(2_000, seed=63), seed=3)

            # 1. A stream stopped on a schema error: 503 naming it; alive all the same.
            async def analytics_stopped() -> bool:
                status, text = await readyz(address)
                return status == 503 and text.startswith("stream analytics stopped: ")

            await until(analytics_stopped, within=60, what="/readyz: analytics stopped")
            # The failure's class, not the database's error text (it names the column).
            assert (await readyz(address))[1] == (
                "stream analytics stopped: SchemaError (SQLSTATE 42703)"
            )
            assert await ready_gauge(address) == 0
            assert await get(address, "/healthz") == (200, "ok")

            # `pipeline migrate` puts the column back: the catalog declares it, with a default.
            await migrated(database_url)
            await agent.activate(["analytics"])
            await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
            await until(lambda: is_ready(address), within=30, what="ready once fixed")
            assert await ready_gauge(address) == 1

            # 2. The database blocked (a table locked past the command timeout): the batch
            # is retried, /readyz says so, and lag keeps being measured, from the records
            # the agent holds.
            metrics = [o for o in fleet_traffic(2_000, seed=64) if o.stream.name == "metrics"]
            lock = await asyncpg.connect(database_url, timeout=10)
            try:
                async with lock.transaction():
                    await lock.execute("LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE")
                    stored = await stored_offsets(database_url, prefix, prefix)
                    blocked = await send(bootstrap, prefix, metrics, seed=4)
                    ends = await end_offsets(bootstrap, prefix)
                    waiting = {p: e - stored[p] for p, e in ends.items() if e > stored[p]}
                    assert sum(waiting.values()) == len(metrics)

                    async def unreachable() -> bool:
                        return await readyz(address) == (503, "database unreachable")

                    await until(unreachable, within=30, what="/readyz: database unreachable")
                    assert await ready_gauge(address) == 0
                    await lag_waits_exactly(address, prefix, waiting, oldest_by_partition(blocked))
                    assert await stored_offsets(database_url, prefix, prefix) == stored
                    assert await get(address, "/healthz") == (200, "ok")
            finally:
                await lock.close()

            ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
            await until(lambda: is_ready(address), within=30, what="ready once unblocked")
            await lag_cleared(address, prefix, ends)
            samples = await scrape(address)
            assert samples[("pipeline_retries_total", frozenset({("kind", "postgres")}))] >= 1


async def test_pipeline_run_serves_metrics_health_and_readiness_on_its_metrics_address(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=2)
    address = free_address()
    env = agent_env(
        bootstrap, database_url, prefix, prefix, metrics_address=address, lag_refresh_s=REFRESH_S
    )
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        sent = await send(bootstrap, prefix, fleet_traffic(1_000, seed=65), seed=5)
        ends = await wait_caught_up(database_url, bootstrap, prefix, prefix, within=120)
        await until(lambda: is_ready(address), within=60, what="ready")
        assert await get(address, "/healthz") == (200, "ok")
        await lag_cleared(address, prefix, ends)
        samples = await scrape(address)
        assert samples[("pipeline_ready", frozenset())] == 1
        assert (
            samples[
                (
                    "pipeline_build_info",
                    frozenset(
                        {("version", build_version()), ("python", platform.python_version())}
                    ),
                )
            ]
            == 1
        )
        assert sum(
            per_stream(samples, "pipeline_end_to_end_latency_seconds_count").values()
        ) == len(sent)

        # A second agent on the same address: a start-up error naming the variable.
        second = AgentProcess(env, tmp_path / "second.log").start()
        try:
            assert second.wait(within=60) == 2
        finally:
            second.kill()
        assert second.log_path is not None
        assert "PIPELINE_METRICS_ADDRESS: cannot serve /metrics on" in second.log_path.read_text()
        assert agent.stop() == 0
    finally:
        agent.kill()
