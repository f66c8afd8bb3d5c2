"""`pipeline bench`: the DatabaseAgent's throughput against the raw limits, in one run.

For each traffic mix, on the same generated records:

1. Produce a backlog of ``records`` records to fresh topics.
2. Raw consume limit: a bare aiokafka consumer drains the backlog, no database.
3. Raw COPY limit: the same records, decoded once, written with the agent's own writers
   (binary COPY, staged upserts) into the same tables in a fresh database, no Kafka.
4. End to end: ``pipeline run`` processes drain the backlog into another fresh database,
   exactly-once path included; their peak RSS is read from ``/proc``.

Ratios compare numbers measured in the same run, because these machines are shared and noisy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline import db
from pipeline import kafka as kafka_io
from pipeline.batching import lag
from pipeline.config import Config
from pipeline.records import DLQ_TOPIC, STREAM_BY_TYPE, STREAMS, Record, encode
from pipeline.rows import DECODERS, Row

RecordSource = Callable[[str, int], Iterator[list[Record]]]  # (mix, count) -> chunks
RAW_COPY_SAMPLE = 200_000  # records decoded for the raw COPY limit: enough for a stable rate


@dataclass
class MixResult:
    mix: str
    records: int
    raw_consume_per_s: float
    raw_copy_per_s: float
    e2e_rows_per_s: float
    ratio: float  # end to end / the smaller raw limit
    peak_rss_mb: float
    e2e_two_processes_rows_per_s: float | None


async def run_bench(
    config: Config,
    source: RecordSource,
    *,
    mixes: list[str],
    records: int,
    partitions: int,
    scale_out: bool,
    report: Callable[[str], None],
) -> list[MixResult]:
    results = []
    for mix in mixes:
        prefix = f"bench{uuid.uuid4().hex[:8]}."
        report(f"[{mix}] producing {records:,} records to {prefix}* ({partitions} partitions)")
        await kafka_io.ensure_topics(
            config.kafka_bootstrap_servers,
            [prefix + s.topic for s in STREAMS] + [prefix + DLQ_TOPIC],
            partitions,
        )
        await _produce(config.kafka_bootstrap_servers, prefix, source(mix, records))

        report(f"[{mix}] raw consume: a bare aiokafka consumer, no database")
        consume_rate, sample = await _raw_consume(config, prefix, records)
        report(f"[{mix}]   {consume_rate:,.0f} records/s")

        report(f"[{mix}] raw COPY: {len(sample):,} decoded rows, the agent's writers, no Kafka")
        async with _scratch_database(config) as url:
            copy_rate = await _raw_copy(url, config, sample)
        report(f"[{mix}]   {copy_rate:,.0f} rows/s")

        report(f"[{mix}] end to end: one DatabaseAgent process drains the backlog")
        async with _scratch_database(config) as url:
            e2e_rate, rss = await _drain(config, url, prefix, processes=1)
        report(f"[{mix}]   {e2e_rate:,.0f} rows/s, peak RSS {rss:.0f} MB")

        two = None
        if scale_out:
            report(f"[{mix}] end to end: two DatabaseAgent processes in one group")
            async with _scratch_database(config) as url:
                two, _ = await _drain(config, url, prefix, processes=2)
            report(f"[{mix}]   {two:,.0f} rows/s")
        results.append(
            MixResult(
                mix=mix,
                records=records,
                raw_consume_per_s=consume_rate,
                raw_copy_per_s=copy_rate,
                e2e_rows_per_s=e2e_rate,
                ratio=e2e_rate / min(consume_rate, copy_rate),
                peak_rss_mb=rss,
                e2e_two_processes_rows_per_s=two,
            )
        )
    return results


def table(results: list[MixResult]) -> str:
    lines = [
        f"{'mix':<14} {'records':>9} {'raw consume/s':>14} {'raw COPY/s':>11} "
        f"{'e2e rows/s':>11} {'ratio':>6} {'peak RSS':>9} {'e2e x2/s':>10}"
    ]
    for r in results:
        two = f"{r.e2e_two_processes_rows_per_s:,.0f}" if r.e2e_two_processes_rows_per_s else "-"
        lines.append(
            f"{r.mix:<14} {r.records:>9,} {r.raw_consume_per_s:>14,.0f} {r.raw_copy_per_s:>11,.0f} "
            f"{r.e2e_rows_per_s:>11,.0f} {r.ratio:>6.2f} {r.peak_rss_mb:>6.0f} MB {two:>10}"
        )
    return "\n".join(lines)


def as_json(results: list[MixResult]) -> dict[str, dict[str, object]]:
    return {r.mix: asdict(r) for r in results}


async def _produce(bootstrap: str, prefix: str, chunks: Iterator[list[Record]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=512 * 1024,
        compression_type="lz4",
    )
    await producer.start()
    try:
        for chunk in chunks:
            futures = []
            for record in chunk:
                stream = STREAM_BY_TYPE[type(record)]
                futures.append(
                    await producer.send(
                        prefix + stream.topic, encode(record), key=stream.key(record)
                    )
                )
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _raw_consume(
    config: Config, prefix: str, records: int
) -> tuple[float, list[tuple[str, int, int, bytes]]]:
    """Drain the backlog with nothing but aiokafka; keep a sample of the records."""
    topics = [prefix + s.topic for s in STREAMS]
    ends = await kafka_io.end_offsets(config.kafka_bootstrap_servers, topics)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.kafka_bootstrap_servers,
        enable_auto_commit=False,
        fetch_max_bytes=config.fetch_max_bytes,
        max_partition_fetch_bytes=min(config.fetch_max_bytes, 8 * 1024 * 1024),
    )
    await consumer.start()
    sample: list[tuple[str, int, int, bytes]] = []
    try:
        partitions = [TopicPartition(t, p) for t, p in ends]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen = 0
        started = time.perf_counter()
        while seen < records:
            batches = await consumer.getmany(timeout_ms=5000, max_records=config.batch_max_records)
            if not batches:
                raise RuntimeError(f"raw consume stalled after {seen} of {records} records")
            for tp, batch in batches.items():
                seen += len(batch)
                if len(sample) < RAW_COPY_SAMPLE:
                    sample.extend((tp.topic, r.partition, r.offset, r.value) for r in batch)
        elapsed = time.perf_counter() - started
    finally:
        await kafka_io.stop_consumer(consumer)
    return seen / elapsed, sample[:RAW_COPY_SAMPLE]


async def _raw_copy(url: str, config: Config, sample: list[tuple[str, int, int, bytes]]) -> float:
    """Write the decoded sample with the agent's writers, batch by batch, one transaction each."""
    decoders = {s.topic: DECODERS[s.name] for s in STREAMS}
    rows: dict[str, list[Row]] = defaultdict(list)
    for topic, partition, offset, value in sample:
        decoder = decoders[topic.split(".", 1)[1]]
        rows[decoder.stream.name].append(decoder.row(value, (), partition, offset, 1))
    conn = await db.connect(url, config.db_command_timeout_s)
    try:
        await db.migrate(conn, db.read_migrations())
        writers = {name: db.TableWriter(DECODERS[name].tables) for name in rows}
        for writer in writers.values():
            await writer.prepare(conn)
        # The same batch shape as the agent: up to batch_max_records per transaction.
        share = {name: len(r) / len(sample) for name, r in rows.items()}
        step = {name: max(1, int(config.batch_max_records * s)) for name, s in share.items()}
        cursor = dict.fromkeys(rows, 0)
        started = time.perf_counter()
        while any(cursor[n] < len(rows[n]) for n in rows):
            async with conn.transaction():
                for name, writer in writers.items():
                    chunk = rows[name][cursor[name] : cursor[name] + step[name]]
                    if chunk:
                        await writer.write(conn, chunk)
                    cursor[name] += step[name]
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return len(sample) / elapsed


async def _drain(config: Config, url: str, prefix: str, processes: int) -> tuple[float, float]:
    """Start agents, time the drain from the first progress to lag 0, read their peak RSS."""
    topics = [prefix + s.topic for s in STREAMS]
    ends = await kafka_io.end_offsets(config.kafka_bootstrap_servers, topics)
    total = sum(ends.values())
    group = f"{prefix}agents"
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=config.kafka_bootstrap_servers,
        DATABASE_URL=url,
        PIPELINE_TOPIC_PREFIX=prefix,
        PIPELINE_GROUP_ID=group,
        PIPELINE_METRICS_ADDRESS="",
        PIPELINE_BATCH_MAX_RECORDS=str(config.batch_max_records),
    )
    agents = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--log-level",
            "WARNING",
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    conn = await asyncpg.connect(url, timeout=10)
    try:
        first: tuple[float, int] | None = None
        while True:
            try:
                remaining = lag(ends, await db.stored_offsets(conn, group))
            except asyncpg.UndefinedTableError:
                remaining = total  # the agent has not migrated yet
            now = time.perf_counter()
            if first is None and remaining < total:
                first = (now, remaining)
            if remaining == 0:
                break
            if any(a.returncode is not None for a in agents):
                raise RuntimeError("a DatabaseAgent exited during the benchmark")
            await asyncio.sleep(0.05)
        assert first is not None
        rss = sum(_peak_rss_mb(a.pid) for a in agents)
    finally:
        await conn.close()
        for agent in agents:
            agent.terminate()
        for agent in agents:
            await asyncio.wait_for(agent.wait(), 60)
    elapsed = now - first[0]
    return first[1] / elapsed if elapsed > 0 else float("inf"), rss


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.asynccontextmanager
async def _scratch_database(config: Config) -> AsyncIterator[str]:
    """A fresh database on the same server, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(config.database_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, query = config.database_url.partition("?")
    try:
        yield f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    finally:
        conn = await asyncpg.connect(config.database_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
