"""`pipeline bench`: the DatabaseAgent's throughput against the raw limits, in one run
(docs/performance.md, "Running it", says what each mode measures and how).

:func:`run_bench` measures, per traffic mix on the same generated records, the raw consume
limit, the raw COPY limit, the end-to-end drain and the latency at steady load, then one
agent's peak RSS on a large backlog; :func:`run_encryption_bench` what TLS and SASL cost;
:func:`run_pooler_bench` what a connection pooler in front of PostgreSQL costs. Ratios compare
numbers measured in the same run: these machines are shared and noisy. Topics, producing,
offsets, scratch databases and agent processes come from :mod:`pipeline.testbed`, which the
integration tests use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import sys
import time
import uuid
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncpg
from aiokafka import TopicPartition

from pipeline import db, kafka_clients, testbed
from pipeline import kafka as kafka_io
from pipeline.batching import Row, lag
from pipeline.catalog import load as builtin_catalog
from pipeline.config import Config
from pipeline.kafka_clients import KafkaSettings
from pipeline.records import Record, encode, record_key, stream_of
from pipeline.rows import decoder
from pipeline.testbed import AgentProcess

RecordSource = Callable[[str, int], Iterator[list[Record]]]  # (mix, count) -> chunks
# (Kafka, topic prefix, mix, records/s, seconds) -> records published
Publisher = Callable[[KafkaSettings, str, str, float, float], Awaitable[int]]
RAW_COPY_SAMPLE = 200_000  # about this many records for the raw COPY limit: a stable rate
# Runs of a few seconds are at the mercy of the machine (a neighbour, the kernel writing back
# dirty pages): both sides of the ratio are the best of this many passes.
PASSES = 3
Measured = TypeVar("Measured")
POLL_S = 0.01  # how often the stored offsets are read: the latency run's resolution


@dataclass(frozen=True)
class Route:
    """How the end-to-end drains' agents reach PostgreSQL: directly, or through a pooler."""

    name: str  # "direct", or the pooler's, as the report names it
    # A scratch database's URL (the administrator's) -> the agents' URL to it.
    agent_url: Callable[[str], str] = testbed.as_agent
    settings: dict[str, str] = field(default_factory=dict)  # the agents' (PIPELINE_<NAME>)


DIRECT = Route("direct")


@dataclass(frozen=True)
class BenchPlan:
    mixes: list[str]
    records: int  # backlog per mix
    partitions: int
    scale_out: bool
    latency_rate: float  # records/s
    latency_seconds: float
    memory_records: int
    profile: Path | None = None  # a directory for py-spy's raw stacks, one file per mix


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
    p50_ms: float
    p99_ms: float
    max_ms: float
    latency_rate: float  # records/s actually published during the latency run
    # For the plot, not the JSON: (seconds, rows ingested) while draining, and latencies.
    drain_curve: list[tuple[float, int]] = field(repr=False)
    latencies_ms: list[float] = field(repr=False)


@dataclass
class MemoryResult:
    records: int
    peak_rss_mb: float
    rows_per_s: float


def missing_extras(profile: bool) -> list[str]:
    """What the bench extra provides that this run needs and the environment lacks:
    matplotlib (the PNG) always, py-spy with ``profile``."""
    missing = []
    if importlib.util.find_spec("matplotlib") is None:
        missing.append("matplotlib (it draws the PNG)")
    if profile and _py_spy() is None:
        missing.append("py-spy (for --profile)")
    return missing


def _py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent))


async def run_bench(
    config: Config,
    source: RecordSource,
    publish: Publisher,
    plan: BenchPlan,
    report: Callable[[str], None],
) -> tuple[list[MixResult], MemoryResult]:
    results = [
        await _bench_mix(config, source=source, publish=publish, plan=plan, mix=mix, report=report)
        for mix in plan.mixes
    ]
    mix = plan.mixes[0]
    report(f"[memory] one DatabaseAgent draining {plan.memory_records:,} {mix} records")
    prefix = await _backlog(config, source, mix, plan.memory_records, plan.partitions)
    async with _scratch_database(config) as url:
        rate, rss, _ = await _drain(config, url, prefix, processes=1)
    report(f"[memory]   peak RSS {rss:.0f} MB ({rate:,.0f} rows/s)")
    return results, MemoryResult(plan.memory_records, rss, rate)


async def _bench_mix(
    config: Config,
    *,
    source: RecordSource,
    publish: Publisher,
    plan: BenchPlan,
    mix: str,
    report: Callable[[str], None],
) -> MixResult:
    report(f"[{mix}] producing {plan.records:,} records ({plan.partitions} partitions)")
    prefix = await _backlog(config, source, mix, plan.records, plan.partitions)

    report(f"[{mix}] raw consume: a bare aiokafka consumer, no database")
    consume_rate, sample = await _raw_consume(config, prefix, plan.records)
    report(f"[{mix}]   {consume_rate:,.0f} records/s")

    report(
        f"[{mix}] raw COPY: {len(sample):,} decoded rows, the agent's writers, no Kafka "
        f"(best of {PASSES} passes, each into a fresh database)"
    )
    rates = await _in_fresh_databases(config, lambda url: _raw_copy(url, config, prefix, sample))
    copy_rate = max(rates)
    report(f"[{mix}]   {copy_rate:,.0f} rows/s (passes: {', '.join(f'{r:,.0f}' for r in rates)})")

    report(
        f"[{mix}] end to end: one DatabaseAgent process drains the backlog "
        f"(best of {PASSES} passes, each into a fresh database)"
    )
    drains = await _in_fresh_databases(config, lambda url: _drain(config, url, prefix, processes=1))
    e2e_rate, _, curve = max(drains, key=lambda drain: drain[0])
    rss = max(drain[1] for drain in drains)
    report(
        f"[{mix}]   {e2e_rate:,.0f} rows/s (passes: {', '.join(f'{d[0]:,.0f}' for d in drains)}), "
        f"peak RSS {rss:.0f} MB"
    )

    if plan.profile is not None:
        stacks = plan.profile / f"{mix}.txt"
        report(f"[{mix}] profile: one DatabaseAgent under py-spy drains the backlog again")
        async with _scratch_database(config) as url:
            await _drain(config, url, prefix, processes=1, profile_to=stacks)
        report(f"[{mix}]   raw stacks in {stacks}\n{profile_breakdown(stacks.read_text())}")

    two = None
    if plan.scale_out:
        report(f"[{mix}] end to end: two DatabaseAgent processes in one group")
        async with _scratch_database(config) as url:
            two, _, _ = await _drain(config, url, prefix, processes=2)
        report(f"[{mix}]   {two:,.0f} rows/s")

    report(
        f"[{mix}] latency: {plan.latency_rate:,.0f} records/s for "
        f"{plan.latency_seconds:g}s while one DatabaseAgent runs"
    )
    async with _scratch_database(config) as url:
        latencies, achieved = await _latency(config, url, publish, plan, mix)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    report(
        f"[{mix}]   p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms "
        f"({achieved:,.0f} records/s published)"
    )
    return MixResult(
        mix=mix,
        records=plan.records,
        raw_consume_per_s=consume_rate,
        raw_copy_per_s=copy_rate,
        e2e_rows_per_s=e2e_rate,
        ratio=e2e_rate / min(consume_rate, copy_rate),
        peak_rss_mb=rss,
        e2e_two_processes_rows_per_s=two,
        p50_ms=p50,
        p99_ms=p99,
        max_ms=latencies[-1],
        latency_rate=achieved,
        drain_curve=curve,
        latencies_ms=latencies,
    )


@dataclass(frozen=True)
class Listener:
    """One way the bench's Kafka traffic goes: plaintext, or SASL_SSL as the stack's users.
    ``publisher`` produces the backlogs; ``agent`` (its ``kafka_*`` settings) is how the raw
    consumer and the DatabaseAgents connect."""

    name: str
    publisher: KafkaSettings
    agent: Config


@dataclass
class EncryptionResult:
    mix: str
    records: int
    # By listener name, in the order given: records/s produced, consumed raw, and rows/s end
    # to end (best of PASSES, the listeners' passes interleaved).
    produce_per_s: dict[str, float]
    raw_consume_per_s: dict[str, float]
    e2e_rows_per_s: dict[str, float]


#: (topic prefix, consumer group) -> the ACLs the listeners' users need on them
Grant = Callable[[str, str], Awaitable[None]]


async def run_encryption_bench(
    config: Config,
    *,
    source: RecordSource,
    listeners: list[Listener],
    grant: Grant,
    plan: BenchPlan,
    report: Callable[[str], None],
) -> list[EncryptionResult]:
    """What TLS and SASL cost, measured in one run: per mix, a backlog is produced through
    each listener (timed), drained raw through each, then drained end to end by one
    DatabaseAgent through each, passes interleaved so the machine's drift hits both alike.
    Topics are created over ``config`` (plaintext), and ``grant`` gives their ACLs."""
    results = []
    for mix in plan.mixes:
        produced: dict[str, float] = {}
        prefixes: dict[str, str] = {}
        for listener in listeners:
            prefix = await _fresh_topics(config, plan.partitions)
            await kafka_io.ensure_control_topics(config.kafka, prefix)
            await grant(prefix, f"{prefix}agents")
            report(f"[{mix}] producing {plan.records:,} records over {listener.name}")
            started = time.perf_counter()
            await _produce(listener.publisher, source, mix, plan.records, prefix)
            produced[listener.name] = plan.records / (time.perf_counter() - started)
            prefixes[listener.name] = prefix
            report(f"[{mix}]   {produced[listener.name]:,.0f} records/s")
        consumed: dict[str, float] = {}
        for listener in listeners:
            rate, _ = await _raw_consume(listener.agent, prefixes[listener.name], plan.records)
            consumed[listener.name] = rate
            report(f"[{mix}] raw consume over {listener.name}: {rate:,.0f} records/s")
        drains: dict[str, list[float]] = defaultdict(list)
        for n in range(PASSES):
            for listener in listeners:
                async with _scratch_database(config) as url:
                    rate, _, _ = await _drain(
                        listener.agent, url, prefixes[listener.name], processes=1
                    )
                drains[listener.name].append(rate)
                report(
                    f"[{mix}] end to end over {listener.name}, pass {n + 1}/{PASSES}: "
                    f"{rate:,.0f} rows/s"
                )
        results.append(
            EncryptionResult(
                mix,
                plan.records,
                produced,
                consumed,
                {name: max(rates) for name, rates in drains.items()},
            )
        )
    return results


def encryption_table(results: list[EncryptionResult]) -> str:
    """Each rate by listener, and the last listener's against the first (1.00 = no cost)."""
    lines = []
    for r in results:
        names = list(r.e2e_rows_per_s)
        base, other = names[0], names[-1]
        lines.append(f"{r.mix}, {r.records:,} records: {other} against {base}")
        for what, rates in (
            ("produce records/s", r.produce_per_s),
            ("raw consume records/s", r.raw_consume_per_s),
            ("end to end rows/s", r.e2e_rows_per_s),
        ):
            lines.append(
                f"  {what:<22} {base} {rates[base]:>11,.0f}   {other} {rates[other]:>11,.0f}"
                f"   ratio {rates[other] / rates[base]:.2f}"
            )
    return "\n".join(lines)


@dataclass
class PoolerResult:
    mix: str
    records: int
    # By route name, direct first: rows/s end to end (best of PASSES, passes interleaved).
    e2e_rows_per_s: dict[str, float]


async def run_pooler_bench(
    config: Config,
    *,
    source: RecordSource,
    pooler: Route,
    plan: BenchPlan,
    report: Callable[[str], None],
) -> list[PoolerResult]:
    """What a connection pooler costs, measured in one run: per mix, one backlog drained end
    to end by one DatabaseAgent directly and through ``pooler``, passes interleaved so the
    machine's drift hits both alike; each pass into a fresh database."""
    results = []
    for mix in plan.mixes:
        report(f"[{mix}] producing {plan.records:,} records ({plan.partitions} partitions)")
        prefix = await _backlog(config, source, mix, plan.records, plan.partitions)
        drains: dict[str, list[float]] = defaultdict(list)
        for n in range(PASSES):
            for route in (DIRECT, pooler):
                async with _scratch_database(config) as url:
                    rate, _, _ = await _drain(config, url, prefix, processes=1, route=route)
                drains[route.name].append(rate)
                report(
                    f"[{mix}] end to end {route.name}, pass {n + 1}/{PASSES}: {rate:,.0f} rows/s"
                )
        results.append(
            PoolerResult(mix, plan.records, {name: max(rates) for name, rates in drains.items()})
        )
    return results


def pooler_table(results: list[PoolerResult]) -> str:
    """End to end through the pooler against direct (1.00 = no cost), as
    :func:`encryption_table` sets its rates."""
    lines = []
    for r in results:
        (base, other), rates = list(r.e2e_rows_per_s), r.e2e_rows_per_s
        lines.append(f"{r.mix}, {r.records:,} records: {other} against {base}")
        lines.append(
            f"  {'end to end rows/s':<22} {base} {rates[base]:>11,.0f}   {other} "
            f"{rates[other]:>11,.0f}   ratio {rates[other] / rates[base]:.2f}"
        )
    return "\n".join(lines)


def table(results: list[MixResult], memory: MemoryResult) -> str:
    lines = [
        f"{'mix':<14} {'records':>9} {'raw consume/s':>14} {'raw COPY/s':>11} "
        f"{'e2e rows/s':>11} {'ratio':>6} {'x2 procs/s':>11} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'peak RSS':>9}"
    ]
    for r in results:
        two = f"{r.e2e_two_processes_rows_per_s:,.0f}" if r.e2e_two_processes_rows_per_s else "-"
        lines.append(
            f"{r.mix:<14} {r.records:>9,} {r.raw_consume_per_s:>14,.0f} "
            f"{r.raw_copy_per_s:>11,.0f} {r.e2e_rows_per_s:>11,.0f} {r.ratio:>6.2f} {two:>11} "
            f"{r.p50_ms:>7.0f} {r.p99_ms:>7.0f} {r.max_ms:>7.0f} {r.peak_rss_mb:>6.0f} MB"
        )
    lines.append(
        f"peak RSS of one agent draining {memory.records:,} records: "
        f"{memory.peak_rss_mb:.0f} MB ({memory.rows_per_s:,.0f} rows/s)"
    )
    return "\n".join(lines)


def as_json(results: list[MixResult], memory: MemoryResult) -> dict[str, object]:
    """The results by mix, plus the large-backlog memory run."""
    skip = {"drain_curve", "latencies_ms"}
    found: dict[str, object] = {
        r.mix: {k: v for k, v in asdict(r).items() if k not in skip} for r in results
    }
    found["memory"] = asdict(memory)
    return found


def plot(results: list[MixResult], path: Path) -> None:
    """Throughput over time while draining, and the latency distribution, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (drain, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        times, rates = _windowed_rates(r.drain_curve, window=1.0)
        drain.plot(times, rates, label=f"{r.mix} ({r.e2e_rows_per_s:,.0f}/s)")
        latency.hist(
            r.latencies_ms, bins=100, histtype="step", label=f"{r.mix} p99 {r.p99_ms:.0f} ms"
        )
    drain.set(title="End to end: rows/s while draining", xlabel="seconds", ylabel="rows/s")
    latency.set(
        title="Latency at steady load", xlabel="ms (record timestamp to commit)", ylabel="records"
    )
    latency.set_yscale("log")
    for axes in (drain, latency):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _windowed_rates(
    curve: list[tuple[float, int]], window: float
) -> tuple[list[float], list[float]]:
    """Rows/s over the last ``window`` seconds at each sample (commits come in batches)."""
    times, rates = [], []
    start = 0
    for t, n in curve:
        while curve[start][0] < t - window:
            start += 1
        t0, n0 = curve[start]
        if t > t0:
            times.append(t)
            rates.append((n - n0) / (t - t0))
    return times, rates


async def _backlog(
    config: Config, source: RecordSource, mix: str, records: int, partitions: int
) -> str:
    """Fresh topics holding ``records`` records of ``mix``; returns their prefix."""
    prefix = await _fresh_topics(config, partitions)
    await _produce(config.kafka, source, mix, records, prefix)
    return prefix


async def _produce(
    kafka: KafkaSettings, source: RecordSource, mix: str, records: int, prefix: str
) -> None:
    """``records`` records of ``mix`` to the topics under ``prefix``, as ``kafka`` connects."""
    # The typed records go to the built-in streams' topics.
    topics = {name: topic for topic, name in builtin_catalog().topics(prefix).items()}

    def messages(chunk: list[Record]) -> list[testbed.Message]:
        return [
            testbed.Message(topics[stream_of(record)], encode(record), record_key(record))
            for record in chunk
        ]

    await testbed.produce(
        kafka,
        map(messages, source(mix, records)),
        linger_ms=20,
        max_batch_size=512 * 1024,
        compression_type="lz4",
    )


async def _fresh_topics(config: Config, partitions: int) -> str:
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    await testbed.create_topics(config.kafka, prefix, partitions)
    return prefix


async def _raw_consume(
    config: Config, prefix: str, records: int
) -> tuple[float, list[tuple[str, int, int, bytes]]]:
    """Drain the backlog with nothing but aiokafka; keep a sample of the records: every
    k-th offset of every partition, so that the sample has the backlog's mix of streams
    (the first records consumed would not: small topics arrive whole, first)."""
    ends = await testbed.end_offsets(config.kafka, prefix)
    consumer = kafka_clients.consumer(
        config.kafka,
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
        stride = max(1, records // RAW_COPY_SAMPLE)
        started = time.perf_counter()
        while seen < records:
            batches = await consumer.getmany(timeout_ms=5000, max_records=config.batch_max_records)
            if not batches:
                raise RuntimeError(f"raw consume stalled after {seen} of {records} records")
            for tp, batch in batches.items():
                seen += len(batch)
                # Offsets are consecutive within a fetch: a slice keeps the clock honest.
                kept = batch[-batch[0].offset % stride :: stride]
                sample.extend((tp.topic, r.partition, r.offset, r.value) for r in kept)
        elapsed = time.perf_counter() - started
    finally:
        await kafka_io.stop_consumer(consumer)
    return seen / elapsed, sample


async def _raw_copy(
    url: str, config: Config, prefix: str, sample: list[tuple[str, int, int, bytes]]
) -> float:
    """Write the decoded sample with the agent's writers, batch by batch, one transaction each."""
    catalog = builtin_catalog()
    stream_of_topic = catalog.topics(prefix)
    decoders = {topic: decoder(catalog[name]) for topic, name in stream_of_topic.items()}
    rows: dict[str, list[Row]] = defaultdict(list)
    for topic, partition, offset, value in sample:
        rows[stream_of_topic[topic]].append(decoders[topic].row(value, (), partition, offset, 1))
    conn = await db.connect(url, config.db_session)
    try:
        await db.migrate(conn, db.read_migrations())
        writers = {name: db.TableWriter(catalog[name]) for name in rows}
        # The same batch shape as the agent: up to batch_max_records per transaction.
        share = {name: len(r) / len(sample) for name, r in rows.items()}
        step = {name: max(1, int(config.batch_max_records * s)) for name, s in share.items()}
        cursor = dict.fromkeys(rows, 0)
        started = time.perf_counter()
        while any(cursor[n] < len(rows[n]) for n in rows):
            async with db.transaction(conn):
                for name, writer in writers.items():
                    chunk = rows[name][cursor[name] : cursor[name] + step[name]]
                    if chunk:
                        await writer.write(conn, chunk)
                    cursor[name] += step[name]
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return len(sample) / elapsed


async def _drain(
    config: Config,
    url: str,
    prefix: str,
    processes: int,
    *,
    profile_to: Path | None = None,
    route: Route = DIRECT,
) -> tuple[float, float, list[tuple[float, int]]]:
    """Start agents and time the drain: from the moment every partition is positioned (the
    agents start fetching) to lag 0, so the first batch's fetch, decode and COPY count too.
    The agents connect by ``route``; the bench watches directly, as the administrator.

    Returns rows/s, the agents' summed peak RSS in MB, and (seconds, rows ingested) samples.
    """
    ends = await testbed.end_offsets(config.kafka, prefix)
    total = sum(ends.values())
    group = f"{prefix}agents"
    agents = [
        _start_agent(config, url, prefix, group, profile_to=profile_to, route=route)
        for _ in range(processes)
    ]
    curve: list[tuple[float, int]] = []
    conn = await asyncpg.connect(url, timeout=10)
    try:
        while True:
            stored = await testbed.stored_offsets(conn, group)
            now = time.perf_counter()
            if len(stored) == len(ends):  # every partition positioned: the clock runs
                remaining = lag(ends, stored)
                curve.append((now, total - remaining))
                if remaining == 0:
                    break
            if not all(a.alive() for a in agents):
                raise RuntimeError("a DatabaseAgent exited during the benchmark")
            await asyncio.sleep(0.02)
        rss = sum(_peak_rss_mb(a.pid) for a in agents) if profile_to is None else float("nan")
    finally:
        await conn.close()
        if profile_to is not None:  # stop the agent, not py-spy, which then writes its stacks
            for spy in agents:
                for child in _children(spy.pid):
                    os.kill(child, signal.SIGTERM)
                await asyncio.to_thread(spy.wait, 60)
        await testbed.stop_agents(agents)
    (t0, n0), (t1, n1) = curve[0], curve[-1]
    rate = (n1 - n0) / (t1 - t0) if t1 > t0 else float("inf")
    return rate, rss, [(t - t0, n) for t, n in curve]


async def _latency(
    config: Config, url: str, publish: Publisher, plan: BenchPlan, mix: str
) -> tuple[list[float], float]:
    """Latencies (ms, sorted) of records published at a steady rate, and the rate achieved."""
    prefix = await _fresh_topics(config, plan.partitions)
    group = f"{prefix}agents"
    agents = [_start_agent(config, url, prefix, group)]
    polls: list[tuple[float, dict[tuple[str, int], int]]] = []
    conn = await asyncpg.connect(url, timeout=10)
    try:
        # Ready when every partition is positioned (has its row in ingest_offsets).
        partitions = len(builtin_catalog()) * plan.partitions
        while len(await testbed.stored_offsets(conn, group)) < partitions:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                polls.append((time.time(), await testbed.stored_offsets(conn, group)))
                await asyncio.sleep(POLL_S)

        poller = asyncio.create_task(poll())
        started = time.perf_counter()
        published = await publish(
            config.kafka, prefix, mix, plan.latency_rate, plan.latency_seconds
        )
        achieved = published / (time.perf_counter() - started)
        ends = await testbed.end_offsets(config.kafka, prefix)
        while any(polls[-1][1].get(tp, 0) < end for tp, end in ends.items()):  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)  # the poller task is what moves polls[-1]
        stop.set()
        await poller
    finally:
        await conn.close()
        await testbed.stop_agents(agents)
    timestamps = await _timestamps(config, ends)
    latencies: list[float] = []
    for tp, stamps in timestamps.items():
        seen = 0
        for when, stored in polls:
            upto = stored.get(tp, 0)
            latencies.extend(when * 1000 - stamps[o] for o in range(seen, upto))
            seen = max(seen, upto)
    latencies.sort()
    return latencies, achieved


async def _timestamps(
    config: Config, ends: dict[tuple[str, int], int]
) -> dict[tuple[str, int], array[int]]:
    """Every record's Kafka timestamp (ms), by partition and offset, read back from Kafka."""
    consumer = kafka_clients.consumer(config.kafka, enable_auto_commit=False)
    await consumer.start()
    found = {tp: array("q", bytes(8 * end)) for tp, end in ends.items()}
    try:
        partitions = [TopicPartition(t, p) for (t, p), end in ends.items() if end]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        left = sum(ends.values())
        while left:
            batches = await consumer.getmany(timeout_ms=5000)
            if not batches:
                raise RuntimeError(f"reading timestamps stalled with {left} records left")
            for tp, records in batches.items():
                stamps = found[(tp.topic, tp.partition)]
                for record in records:
                    stamps[record.offset] = record.timestamp
                left -= len(records)
    finally:
        await kafka_io.stop_consumer(consumer)
    return found


# Who owns a stack's innermost known frame, in the order asked.
_OWNERS = [
    ("pipeline/rows.py", "ours: decoding into rows (msgspec's C decoder + our Python)"),
    ("pipeline/", "ours: other (batching, planning, writing, metrics)"),
    ("consumers/", "ours: other (batching, planning, writing, metrics)"),
    ("aiokafka/", "aiokafka: fetching, unpacking records"),
    ("asyncpg/", "asyncpg: COPY encoding, protocol"),
    ("selectors.py", "idle: waiting for PostgreSQL or Kafka"),
]
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*):(?P<line>\d+)\)$")


def profile_breakdown(raw_stacks: str) -> str:
    """Where the agent's time went, from py-spy's raw stacks (``stack count`` per line):
    each sample goes to the owner of its innermost frame in our code, a driver, or the
    event loop's wait; start-up (anything outside the event loop) is left out. Shares of
    the samples, largest first, then our busiest lines."""
    owners: dict[str, int] = defaultdict(int)
    our_lines: dict[str, int] = defaultdict(int)
    total = 0
    for line in raw_stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        if "run_forever" not in stack:
            continue
        samples = int(count)
        total += samples
        owner, where = "Python runtime and asyncio", ""
        for frame in reversed(stack.split(";")):
            match = _FRAME.match(frame)
            if match is None:
                continue
            if match["function"].endswith(("run_forever", "_run_once")):
                break  # the event loop's own work: what called the loop does not own it
            path = match["path"]
            found = next((name for prefix, name in _OWNERS if path.startswith(prefix)), None)
            if found is not None:
                owner = found
                if found.startswith("ours"):
                    where = f"{path}:{match['line']} {match['function']}"
                break
        owners[owner] += samples
        if where:
            our_lines[where] += samples
    if not total:
        return "no samples"
    ranked = sorted(owners.items(), key=lambda item: -item[1])
    lines = [f"{100 * n / total:5.1f}%  {owner}" for owner, n in ranked]
    lines.append(f"of {total:,} samples; our busiest lines:")
    top = sorted(our_lines.items(), key=lambda item: -item[1])[:8]
    lines.extend(f"{100 * n / total:5.1f}%    {where}" for where, n in top)
    return "\n".join(lines)


def _percentile(ordered: list[float], percent: float) -> float:
    index = min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))
    return ordered[index]


def _start_agent(
    config: Config,
    url: str,
    prefix: str,
    group: str,
    *,
    profile_to: Path | None = None,
    route: Route = DIRECT,
) -> AgentProcess:
    env = testbed.agent_env(
        config.kafka.bootstrap_servers,
        route.agent_url(url),
        prefix,
        group,
        batch_max_records=config.batch_max_records,
        # Agents as deployed: each one's controller trusts Antigravity's key.
        control_public_keys=",".join(config.control_public_keys),
        **route.settings,
    )
    env.update(config.kafka.environment())  # over TLS and SASL when the config says so
    wrapper: list[str] = []
    if profile_to is not None:
        spy = _py_spy()
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install -e '.[bench]'")
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        # --idle: time spent waiting for PostgreSQL or Kafka shows as such.
        wrapper = [spy, "record", "-r", "200", "--idle", "--format", "raw", "-o", str(profile_to),
                   "--"]  # fmt: skip
    return AgentProcess(env, args=["--log-level", "WARNING"], wrapper=wrapper).start()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _in_fresh_databases(
    config: Config, measure: Callable[[str], Awaitable[Measured]]
) -> list[Measured]:
    """``measure`` once per pass, each time against a fresh scratch database."""
    results = []
    for _ in range(PASSES):
        async with _scratch_database(config) as url:
            results.append(await measure(url))
    return results


@contextlib.asynccontextmanager
async def _scratch_database(config: Config) -> AsyncIterator[str]:
    """A fresh database on the same server, migrated, dropped afterwards.

    Autovacuum is off on its tables, in every run alike: a vacuum worker that lands in one
    run and not in another would decide a ratio more than the code does. (In production it
    stays on.)
    """
    name = f"bench_{uuid.uuid4().hex[:12]}"
    async with testbed.scratch_database(config.database_url, name) as url:
        conn = await db.connect(url, config.db_session)
        try:
            await db.migrate(conn, db.read_migrations())
            tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            for row in tables:
                await conn.execute(
                    f'ALTER TABLE "{row[0]}" SET (autovacuum_enabled = off, '
                    "toast.autovacuum_enabled = off)"
                )
        finally:
            await conn.close()
        yield url
