"""`pipeline bench`: the DatabaseAgent's throughput against the raw limits, in one run
(docs/performance.md, "Running it", says what each mode measures and how).

:func:`run_bench` measures, per traffic mix on the same generated records (the simulator's
on the built-in streams, or the catalog mix of user streams, :data:`BENCH_STREAMS_FILE`), the
raw consume limit, the raw COPY limit, the end-to-end drain and the latency at steady load,
then one agent's peak RSS on a large backlog; :func:`run_encryption_bench` what TLS and SASL cost;
:func:`run_pooler_bench` what a connection pooler in front of PostgreSQL costs. Ratios compare
numbers measured in the same run: these machines are shared and noisy. Topics, producing,
offsets, scratch databases and agent processes come from :mod:`pipeline.testbed`, which the
integration tests use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import time
import uuid
from array import array
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple, TypeVar

import asyncpg
import msgspec
from aiokafka import TopicPartition

from pipeline import db, kafka_clients, partition_maint, sql_names, testbed
from pipeline import kafka as kafka_io
from pipeline.batching import Row, lag
from pipeline.catalog import Catalog
from pipeline.catalog import load as load_catalog
from pipeline.config import Config
from pipeline.errors import ConfigError
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

#: The mix of user streams (:data:`BENCH_STREAMS_FILE`); the other mixes are the simulator's.
CATALOG_MIX = "catalog"
BENCH_STREAMS_FILE = Path(__file__).resolve().parent / "bench_streams.toml"
# Out of every ten records of the catalog mix: seven readings, two clicks, one order revision.
_CATALOG_PATTERN = ("readings",) * 7 + ("clicks",) * 2 + ("orders",)
CLICK_REDELIVERY = 50  # every 50th click is the previous one sent again (a producer's retry)
ORDER_REVISIONS = 4  # records per order; the 2nd and 3rd of every other order arrive swapped
_ORDER_STATUS = ("placed", "paid", "shipped", "delivered")
_COUNTRIES = ("DE", "FR", "US", "JP", "BR", "IN", "GB", "NG")
_CATALOG_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)  # the records' times: deterministic too
_CATALOG_EPOCH_MS = int(_CATALOG_EPOCH.timestamp() * 1000)


@dataclass(frozen=True)
class Streams:
    """The streams a mix's records go to: the catalog of its topics, tables and scratch
    databases, and the streams file its agents read (None: the built-in streams)."""

    catalog: Catalog
    file: Path | None = None


def streams_of(mix: str) -> Streams:
    """The streams of ``mix``: the bench catalog's for :data:`CATALOG_MIX`, else the
    built-in ones."""
    if mix == CATALOG_MIX:
        return Streams(load_catalog(BENCH_STREAMS_FILE), BENCH_STREAMS_FILE)
    return Streams(load_catalog())


class CatalogRecord(NamedTuple):
    """One record of the catalog mix: its stream, JSON value and Kafka key."""

    stream: str
    value: bytes
    key: bytes | None


def catalog_records(seed: int) -> Iterator[CatalogRecord]:
    """The catalog mix's records, endless, the same for the same ``seed``: record ``i`` is
    of stream ``_CATALOG_PATTERN[i % 10]``; :func:`catalog_rows` says how many rows the
    first ``n`` make."""
    rng = random.Random(seed)
    encode_json = msgspec.json.encode
    click: CatalogRecord | None = None
    clicks = orders = 0
    order_id = b""
    total = ""
    for i in itertools.count():
        stream = _CATALOG_PATTERN[i % len(_CATALOG_PATTERN)]
        if stream == "readings":
            at = _CATALOG_EPOCH + timedelta(milliseconds=i)
            value = {
                "sensor": f"sensor-{rng.randrange(500):03d}",
                "reading": round(rng.gauss(21.0, 4.0), 3),
                "seq": i,
                "read_at": at.isoformat(),
                "attrs": {"unit": "C", "firmware": "2.4.1", "battery": rng.randrange(101)},
            }
            yield CatalogRecord(stream, encode_json(value), None)
        elif stream == "clicks":
            clicks += 1
            if click is None or clicks % CLICK_REDELIVERY:
                click_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                cents = rng.randrange(100, 100_000)
                value = {
                    "click_id": click_id,
                    "user": {
                        "id": f"user-{rng.randrange(100_000)}",
                        "geo": {"country": rng.choice(_COUNTRIES)},
                    },
                    "clicked_at": _CATALOG_EPOCH_MS + i,
                    "price": f"{cents // 100}.{cents % 100:02d}",
                }
                click = CatalogRecord(stream, encode_json(value), click_id.encode())
            yield click
        else:
            number, step = divmod(orders, ORDER_REVISIONS)
            orders += 1
            if step == 0:
                order_id = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
                cents = rng.randrange(500, 500_000)
                total = f"{cents // 100}.{cents % 100:02d}"
            revision = step + 1
            if number % 2 and step in (1, 2):
                revision = 5 - revision  # 3 then 2: the older revision arrives late
            value = {
                "order_id": order_id.decode(),
                "revision": revision,
                "status": _ORDER_STATUS[revision - 1],
                "total": total,
                "updated_at": (_CATALOG_EPOCH + timedelta(milliseconds=i)).isoformat(),
            }
            yield CatalogRecord(stream, encode_json(value), order_id)


def catalog_rows(records: int) -> dict[str, int]:
    """The rows, by stream, that the first ``records`` of :func:`catalog_records` leave:
    one per reading, one per click but its redeliveries, one per order."""
    full, rest = divmod(records, len(_CATALOG_PATTERN))
    counts = Counter(_CATALOG_PATTERN[:rest])
    for stream in _CATALOG_PATTERN:
        counts[stream] += full
    return {
        "readings": counts["readings"],
        "clicks": counts["clicks"] - counts["clicks"] // CLICK_REDELIVERY,
        "orders": -(-counts["orders"] // ORDER_REVISIONS),
    }


async def publish_catalog(
    kafka: KafkaSettings, prefix: str, rate: float, seconds: float, *, seed: int, tick: float = 0.05
) -> int:
    """:func:`catalog_records` to the bench catalog's topics under ``prefix`` at ``rate``
    records/s for ``seconds``, paced as the simulator paces the built-in mixes; the number
    of records acknowledged."""
    topics = {name: topic for topic, name in streams_of(CATALOG_MIX).catalog.topics(prefix).items()}
    records = catalog_records(seed)
    target = round(rate * seconds)
    max_per_tick = max(1, math.ceil(rate * tick * 4))  # catching up: a few ticks at a time
    producer = kafka_clients.producer(kafka, acks="all", enable_idempotence=True)
    await producer.start()
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        previous: list[asyncio.Future[object]] = []
        start = loop.time()
        for tick_no in itertools.count(1):
            due = min(target, math.floor(rate * (loop.time() - start + tick)))
            current = [
                await producer.send(topics[r.stream], r.value, key=r.key)
                for r in itertools.islice(records, max(0, min(due - sent, max_per_tick)))
            ]
            sent += len(current)
            await asyncio.gather(*previous)  # at most about two ticks in flight
            previous = current
            if sent >= target or loop.time() - start >= seconds:
                break
            await asyncio.sleep(max(0.0, start + tick_no * tick - loop.time()))
        await asyncio.gather(*previous)
    finally:
        await producer.stop()
    return sent


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
    # The agent process's utime + stime over the drain, per 1M rows: the least of the passes.
    cpu_s_per_1m_rows: float
    ratio: float  # end to end / the smaller raw limit
    copy_ratio: float  # end to end / raw COPY
    # `pipeline replay` of the whole backlog into a fresh database: records/s, best of the
    # passes, and that against the end-to-end drain's.
    replay_records_per_s: float
    replay_ratio: float
    peak_rss_mb: float
    e2e_two_processes_rows_per_s: float | None
    p50_ms: float
    p99_ms: float
    max_ms: float
    latency_rate: float  # records/s actually published during the latency run
    # For the plot, not the JSON: (seconds, rows ingested) while draining, and latencies.
    drain_curve: list[tuple[float, int]] = field(repr=False)
    latencies_ms: list[float] = field(repr=False)


class Drain(NamedTuple):
    """One end-to-end drain, as :func:`_drain` measured it."""

    rows_per_s: float
    peak_rss_mb: float  # the agents' peaks, summed
    cpu_s_per_1m_rows: float  # the agents' utime + stime over the drain, summed, per 1M rows
    curve: list[tuple[float, int]]  # (seconds, rows ingested)


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
    streams = streams_of(mix)
    report(f"[memory] one DatabaseAgent draining {plan.memory_records:,} {mix} records")
    prefix = await _backlog(config, source, mix, plan.memory_records, plan.partitions)
    async with _scratch_database(config, streams.catalog) as url:
        rate, rss, _, _ = await _drain(
            config, url, prefix, 1, streams, expected=_expected(mix, plan.memory_records)
        )
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
    streams = streams_of(mix)
    expected = _expected(mix, plan.records)
    report(f"[{mix}] producing {plan.records:,} records ({plan.partitions} partitions)")
    prefix = await _backlog(config, source, mix, plan.records, plan.partitions)

    report(f"[{mix}] raw consume: a bare aiokafka consumer, no database")
    consume_rate, sample = await _raw_consume(config, prefix, plan.records, streams.catalog)
    report(f"[{mix}]   {consume_rate:,.0f} records/s")

    report(
        f"[{mix}] raw COPY: {len(sample):,} decoded rows, the agent's writers, no Kafka "
        f"(best of {PASSES} passes, each into a fresh database)"
    )
    rates = await _in_fresh_databases(
        config, streams.catalog, lambda url: _raw_copy(url, config, prefix, streams.catalog, sample)
    )
    copy_rate = max(rates)
    report(f"[{mix}]   {copy_rate:,.0f} rows/s (passes: {', '.join(f'{r:,.0f}' for r in rates)})")

    report(
        f"[{mix}] end to end: one DatabaseAgent process drains the backlog "
        f"(best of {PASSES} passes, each into a fresh database)"
    )
    drains = await _in_fresh_databases(
        config,
        streams.catalog,
        lambda url: _drain(config, url, prefix, 1, streams, expected=expected),
    )
    e2e_rate, _, _, curve = max(drains, key=lambda drain: drain.rows_per_s)
    rss = max(drain.peak_rss_mb for drain in drains)
    # CPU time is what the agent spent, not how long it waited: the least of the passes is the
    # one a neighbour disturbed least (cache misses, migrations between the cores).
    cpu = min(drain.cpu_s_per_1m_rows for drain in drains)
    report(
        f"[{mix}]   {e2e_rate:,.0f} rows/s (passes: "
        f"{', '.join(f'{d.rows_per_s:,.0f}' for d in drains)}), peak RSS {rss:.0f} MB, "
        f"{cpu:.2f} CPU-s per 1M rows (passes: "
        f"{', '.join(f'{d.cpu_s_per_1m_rows:.2f}' for d in drains)})"
    )

    report(
        f"[{mix}] replay: `pipeline replay` of the whole backlog "
        f"(best of {PASSES} passes, each into a fresh database)"
    )
    replays = await _in_fresh_databases(
        config, streams.catalog, lambda url: _replay(config, url, prefix, streams, expected)
    )
    replay_rate = max(replays)
    report(
        f"[{mix}]   {replay_rate:,.0f} records/s, {replay_rate / e2e_rate:.2f} of the live drain "
        f"(passes: {', '.join(f'{r:,.0f}' for r in replays)})"
    )

    if plan.profile is not None:
        stacks = plan.profile / f"{mix}.txt"
        report(f"[{mix}] profile: one DatabaseAgent under py-spy drains the backlog again")
        async with _scratch_database(config, streams.catalog) as url:
            await _drain(config, url, prefix, 1, streams, profile_to=stacks)
        report(f"[{mix}]   raw stacks in {stacks}\n{profile_breakdown(stacks.read_text())}")

    two = None
    if plan.scale_out:
        report(f"[{mix}] end to end: two DatabaseAgent processes in one group")
        async with _scratch_database(config, streams.catalog) as url:
            two = (await _drain(config, url, prefix, 2, streams, expected=expected)).rows_per_s
        report(f"[{mix}]   {two:,.0f} rows/s")

    report(
        f"[{mix}] latency: {plan.latency_rate:,.0f} records/s for "
        f"{plan.latency_seconds:g}s while one DatabaseAgent runs"
    )
    async with _scratch_database(config, streams.catalog) as url:
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
        cpu_s_per_1m_rows=cpu,
        ratio=e2e_rate / min(consume_rate, copy_rate),
        copy_ratio=e2e_rate / copy_rate,
        replay_records_per_s=replay_rate,
        replay_ratio=replay_rate / e2e_rate,
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


#: (topic prefix, consumer group, streams) -> the ACLs the listeners' users need on them
Grant = Callable[[str, str, Catalog], Awaitable[None]]


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
        streams = streams_of(mix)
        produced: dict[str, float] = {}
        prefixes: dict[str, str] = {}
        for listener in listeners:
            prefix = await _fresh_topics(config, plan.partitions, streams.catalog)
            await kafka_io.ensure_control_topics(config.kafka, prefix)
            await grant(prefix, f"{prefix}agents", streams.catalog)
            report(f"[{mix}] producing {plan.records:,} records over {listener.name}")
            started = time.perf_counter()
            await _produce(listener.publisher, source, mix, plan.records, prefix)
            produced[listener.name] = plan.records / (time.perf_counter() - started)
            prefixes[listener.name] = prefix
            report(f"[{mix}]   {produced[listener.name]:,.0f} records/s")
        consumed: dict[str, float] = {}
        for listener in listeners:
            rate, _ = await _raw_consume(
                listener.agent, prefixes[listener.name], plan.records, streams.catalog
            )
            consumed[listener.name] = rate
            report(f"[{mix}] raw consume over {listener.name}: {rate:,.0f} records/s")
        drains: dict[str, list[float]] = defaultdict(list)
        for n in range(PASSES):
            for listener in listeners:
                async with _scratch_database(config, streams.catalog) as url:
                    rate = (
                        await _drain(listener.agent, url, prefixes[listener.name], 1, streams)
                    ).rows_per_s
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
        streams = streams_of(mix)
        report(f"[{mix}] producing {plan.records:,} records ({plan.partitions} partitions)")
        prefix = await _backlog(config, source, mix, plan.records, plan.partitions)
        drains: dict[str, list[float]] = defaultdict(list)
        for n in range(PASSES):
            for route in (DIRECT, pooler):
                async with _scratch_database(config, streams.catalog) as url:
                    drain = await _drain(config, url, prefix, 1, streams, route=route)
                    rate = drain.rows_per_s
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
        f"{'e2e rows/s':>11} {'CPU-s/1M':>9} {'ratio':>6} {'/COPY':>6} {'replay/s':>9} "
        f"{'/live':>6} {'x2 procs/s':>11} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'peak RSS':>9}"
    ]
    for r in results:
        two = f"{r.e2e_two_processes_rows_per_s:,.0f}" if r.e2e_two_processes_rows_per_s else "-"
        lines.append(
            f"{r.mix:<14} {r.records:>9,} {r.raw_consume_per_s:>14,.0f} "
            f"{r.raw_copy_per_s:>11,.0f} {r.e2e_rows_per_s:>11,.0f} "
            f"{r.cpu_s_per_1m_rows:>9.2f} {r.ratio:>6.2f} "
            f"{r.copy_ratio:>6.2f} {r.replay_records_per_s:>9,.0f} {r.replay_ratio:>6.2f} "
            f"{two:>11} {r.p50_ms:>7.0f} {r.p99_ms:>7.0f} {r.max_ms:>7.0f} "
            f"{r.peak_rss_mb:>6.0f} MB"
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


#: The recorded baseline the bench compares each run with (docs/performance.md, "The baseline").
BASELINE_FILE = Path(__file__).resolve().parent / "bench_baseline.json"
#: A measure further than this from its baseline, either way, is flagged.
DRIFT = 0.05
# The measures compared with the baseline: MixResult's field, its name in the table, and
# which way is worse.
_BASELINE_MEASURES = (
    ("e2e_rows_per_s", "rows/s", "slower", "faster"),
    ("cpu_s_per_1m_rows", "CPU-s/1M", "less CPU", "more CPU"),
)


@dataclass(frozen=True)
class Drift:
    """One measure of one mix against its baseline."""

    mix: str
    measure: str  # as the table names it: rows/s, CPU-s/1M
    baseline: float
    now: float
    below: str  # what a ratio under 1 means: "slower", "less CPU"
    above: str

    @property
    def ratio(self) -> float:
        return self.now / self.baseline

    @property
    def flagged(self) -> bool:
        """Further than :data:`DRIFT` from the baseline (NaN, a measure that failed, is)."""
        return not abs(self.ratio - 1) <= DRIFT

    def verdict(self) -> str:
        if not self.flagged:
            return "ok"
        if math.isnan(self.ratio):
            return "DRIFT: not measured"
        way = self.below if self.ratio < 1 else self.above
        return f"DRIFT: {way} by {abs(self.ratio - 1):.0%}"


def compare_with_baseline(
    results: list[MixResult], baseline: dict[str, object] | None, partitions: int
) -> tuple[list[Drift], list[str]]:
    """Each mix's rows/s and CPU-s/1M against ``baseline`` (a file :func:`baseline_record`
    made), and a note for each mix not compared: a baseline of another size or partition count
    measures another thing (start-up weighs more in a small drain)."""
    if baseline is None:
        return [], ["no baseline: record one with `pipeline bench --record-baseline`"]
    drifts: list[Drift] = []
    notes: list[str] = []
    mixes = baseline.get("mixes")
    recorded = mixes if isinstance(mixes, dict) else {}
    for r in results:
        base = recorded.get(r.mix)
        if not isinstance(base, dict):
            notes.append(f"{r.mix}: not in the baseline")
            continue
        if (base.get("records"), baseline.get("partitions")) != (r.records, partitions):
            notes.append(
                f"{r.mix}: the baseline drained {base.get('records'):,} records on "
                f"{baseline.get('partitions')} partitions, this run {r.records:,} on "
                f"{partitions}: not compared"
            )
            continue
        for name, measure, below, above in _BASELINE_MEASURES:
            drifts.append(Drift(r.mix, measure, float(base[name]), getattr(r, name), below, above))
    return drifts, notes


def baseline_table(drifts: list[Drift], notes: list[str], source: str) -> str:
    """The comparison with the baseline: ``source`` says which (path, commit, date)."""
    lines = [f"against the baseline ({source}), drift flagged beyond {DRIFT:.0%}:"]
    if drifts:
        lines.append(f"{'mix':<14} {'measure':<9} {'baseline':>10} {'now':>10} {'ratio':>6}")
        for d in drifts:
            digits = 0 if d.measure == "rows/s" else 2
            lines.append(
                f"{d.mix:<14} {d.measure:<9} {d.baseline:>10,.{digits}f} {d.now:>10,.{digits}f} "
                f"{d.ratio:>6.2f}  {d.verdict()}"
            )
    lines.extend(notes)
    return "\n".join(lines)


def baseline_source(path: Path, baseline: dict[str, object] | None) -> str:
    """How :func:`baseline_table` names the baseline."""
    if baseline is None:
        return str(path)
    commit = str(baseline.get("commit", "?"))[:9]
    return f"{path.name}: commit {commit}, recorded {baseline.get('recorded_at', '?')}"


def baseline_record(
    results: list[MixResult],
    *,
    partitions: int,
    commit: str,
    recorded_at: str,
    command: str,
    machine: dict[str, object],
) -> dict[str, object]:
    """What ``--record-baseline`` writes: where and how the numbers were measured, and each
    mix's measures that later runs are compared with."""
    return {
        "recorded_at": recorded_at,
        "commit": commit,
        "command": command,
        "machine": machine,
        "partitions": partitions,
        "mixes": {
            r.mix: {"records": r.records}
            | {name: getattr(r, name) for name, *_ in _BASELINE_MEASURES}
            for r in results
        },
    }


def read_baseline(path: Path) -> dict[str, object] | None:
    """The baseline at ``path``, None when there is none; a file that is not one is an error
    naming it."""
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--baseline {path}: not a baseline the bench wrote: {exc}") from None
    if not isinstance(found, dict) or not isinstance(found.get("mixes"), dict):
        raise ConfigError(f'--baseline {path}: not a baseline the bench wrote (no "mixes")')
    return found


def machine_facts(load_before: tuple[float, float, float]) -> dict[str, object]:
    """What the baseline says of the machine it was measured on: its CPU, memory, kernel and
    Python, and how loaded it was (the 1, 5 and 15 minute load averages before and after)."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next(
        (
            line.partition(":")[2].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    memory = next(
        (
            int(line.split()[1])
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gb": round(memory / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


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
    prefix = await _fresh_topics(config, partitions, streams_of(mix).catalog)
    await _produce(config.kafka, source, mix, records, prefix)
    return prefix


async def _produce(
    kafka: KafkaSettings, source: RecordSource, mix: str, records: int, prefix: str
) -> None:
    """``records`` records of ``mix`` to the topics under ``prefix``, as ``kafka`` connects."""
    topics = {name: topic for topic, name in streams_of(mix).catalog.topics(prefix).items()}
    chunks: Iterator[list[testbed.Message]]
    if mix == CATALOG_MIX:
        generated = catalog_records(seed=1)
        chunks = (
            [
                testbed.Message(topics[r.stream], r.value, r.key)
                for r in itertools.islice(generated, min(10_000, records - start))
            ]
            for start in range(0, records, 10_000)
        )
    else:  # the typed records go to the built-in streams' topics

        def messages(chunk: list[Record]) -> list[testbed.Message]:
            return [
                testbed.Message(topics[stream_of(record)], encode(record), record_key(record))
                for record in chunk
            ]

        chunks = map(messages, source(mix, records))
    await testbed.produce(
        kafka,
        chunks,
        linger_ms=20,
        max_batch_size=512 * 1024,
        compression_type="lz4",
    )


async def _fresh_topics(config: Config, partitions: int, catalog: Catalog) -> str:
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    await testbed.create_topics(config.kafka, prefix, partitions, catalog)
    return prefix


async def _raw_consume(
    config: Config, prefix: str, records: int, catalog: Catalog
) -> tuple[float, list[tuple[str, int, int, bytes]]]:
    """Drain the backlog with nothing but aiokafka; keep a sample of the records: every
    k-th offset of every partition, so that the sample has the backlog's mix of streams
    (the first records consumed would not: small topics arrive whole, first)."""
    ends = await testbed.end_offsets(config.kafka, prefix, catalog)
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
    url: str,
    config: Config,
    prefix: str,
    catalog: Catalog,
    sample: list[tuple[str, int, int, bytes]],
) -> float:
    """Write the decoded sample with the agent's writers, batch by batch, one transaction each.
    (No column of the bench's streams takes the Kafka key: the sample keeps none.)"""
    stream_of_topic = catalog.topics(prefix)
    decoders = {topic: decoder(catalog[name]) for topic, name in stream_of_topic.items()}
    rows: dict[str, list[Row]] = defaultdict(list)
    for topic, partition, offset, value in sample:
        rows[stream_of_topic[topic]].append(decoders[topic].row(value, (), partition, offset, 1))
    conn = await db.connect(url, config.db_session)
    try:
        await db.migrate(conn, db.read_migrations(), catalog)
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
                        await writer.write(conn, chunk, last=True)  # as the agent does
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
    streams: Streams,
    *,
    expected: dict[str, int] | None = None,
    profile_to: Path | None = None,
    route: Route = DIRECT,
) -> Drain:
    """Start agents and time the drain: from the moment every partition is positioned (the
    agents start fetching) to lag 0, so the first batch's fetch, decode and COPY count too.
    The agents connect by ``route``; the bench watches directly, as the administrator.
    ``expected``: the rows each stream's table must then hold (:func:`_check_rows`).

    The agents' CPU is read from /proc (utime + stime of each ``pipeline run``) when the clock
    starts and at lag 0, so start-up (imports, connecting, joining the group) is left out;
    under py-spy (``profile_to``) it and the RSS are NaN, as the pid is the profiler's.
    """
    ends = await testbed.end_offsets(config.kafka, prefix, streams.catalog)
    total = sum(ends.values())
    group = f"{prefix}agents"
    agents = [
        _start_agent(config, url, prefix, group, streams.file, profile_to=profile_to, route=route)
        for _ in range(processes)
    ]
    curve: list[tuple[float, int]] = []
    measured = profile_to is None
    cpu_start = cpu_end = float("nan")
    conn = await asyncpg.connect(url, timeout=10)
    try:
        while True:
            stored = await testbed.stored_offsets(conn, group)
            now = time.perf_counter()
            if len(stored) == len(ends):  # every partition positioned: the clock runs
                remaining = lag(ends, stored)
                if not curve and measured:
                    cpu_start = sum(_cpu_seconds(a.pid) for a in agents)
                curve.append((now, total - remaining))
                if remaining == 0:
                    if measured:
                        cpu_end = sum(_cpu_seconds(a.pid) for a in agents)
                    break
            if not all(a.alive() for a in agents):
                raise RuntimeError("a DatabaseAgent exited during the benchmark")
            await asyncio.sleep(0.02)
        rss = sum(_peak_rss_mb(a.pid) for a in agents) if measured else float("nan")
        if expected is not None:
            await _check_rows(conn, streams.catalog, expected)
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
    return Drain(
        rate, rss, per_million(cpu_end - cpu_start, n1 - n0), [(t - t0, n) for t, n in curve]
    )


async def _replay(
    config: Config, url: str, prefix: str, streams: Streams, expected: dict[str, int] | None
) -> float:
    """`pipeline replay` of every stream's whole backlog into ``url``'s fresh database, as an
    operator backfills one: its records/s by its own summary (the run, from its first fetch to
    its last commit; not resolving the range). ``expected``: the rows each stream's table must
    then hold (:func:`_check_rows`)."""
    env = _agent_env(config, url, prefix, f"{prefix}replay", streams.file)
    names = ",".join(streams.catalog.names)
    command = [*testbed.REPLAY_COMMAND, "--stream", names, "--from", "earliest", "--to", "now"]
    replay = await asyncio.create_subprocess_exec(
        *command, "--json", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await replay.communicate()
    if replay.returncode != 0:
        raise RuntimeError(f"pipeline replay exited {replay.returncode}: {err.decode()[-2000:]}")
    summary = json.loads(out)
    if expected is not None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await _check_rows(conn, streams.catalog, expected)
        finally:
            await conn.close()
    return float(summary["records"]) / float(summary["seconds"])


async def _latency(
    config: Config, url: str, publish: Publisher, plan: BenchPlan, mix: str
) -> tuple[list[float], float]:
    """Latencies (ms, sorted) of records published at a steady rate, and the rate achieved.
    The catalog mix's records come from :func:`publish_catalog`, the others' from
    ``publish``."""
    streams = streams_of(mix)
    prefix = await _fresh_topics(config, plan.partitions, streams.catalog)
    group = f"{prefix}agents"
    agents = [_start_agent(config, url, prefix, group, streams.file)]
    polls: list[tuple[float, dict[tuple[str, int], int]]] = []
    conn = await asyncpg.connect(url, timeout=10)
    try:
        # Ready when every partition is positioned (has its row in ingest_offsets).
        partitions = len(streams.catalog) * plan.partitions
        while len(await testbed.stored_offsets(conn, group)) < partitions:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                polls.append((time.time(), await testbed.stored_offsets(conn, group)))
                await asyncio.sleep(POLL_S)

        poller = asyncio.create_task(poll())
        started = time.perf_counter()
        if mix == CATALOG_MIX:
            published = await publish_catalog(
                config.kafka, prefix, plan.latency_rate, plan.latency_seconds, seed=2
            )
        else:
            published = await publish(
                config.kafka, prefix, mix, plan.latency_rate, plan.latency_seconds
            )
        achieved = published / (time.perf_counter() - started)
        ends = await testbed.end_offsets(config.kafka, prefix, streams.catalog)
        while any(polls[-1][1].get(tp, 0) < end for tp, end in ends.items()):  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)  # the poller task is what moves polls[-1]
        stop.set()
        await poller
        expected = _expected(mix, published)
        if expected is not None:
            await _check_rows(conn, streams.catalog, expected)
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


def _expected(mix: str, records: int) -> dict[str, int] | None:
    """The rows by stream that ``records`` of ``mix`` leave, when the bench knows them: for
    the catalog mix, whose generator it owns."""
    return catalog_rows(records) if mix == CATALOG_MIX else None


async def _check_rows(conn: asyncpg.Connection, catalog: Catalog, expected: dict[str, int]) -> None:
    """Each stream's table holds the rows ``expected`` says: a drain that wrote nothing (or
    too much) is an error, not a rate."""
    found = {
        name: await conn.fetchval(f"SELECT count(*) FROM {sql_names.table(catalog[name].table)}")
        for name in expected
    }
    if found != expected:
        raise RuntimeError(f"the drain left rows {found} where the records make {expected}")


def _percentile(ordered: list[float], percent: float) -> float:
    index = min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))
    return ordered[index]


def _start_agent(
    config: Config,
    url: str,
    prefix: str,
    group: str,
    streams_file: Path | None,
    *,
    profile_to: Path | None = None,
    route: Route = DIRECT,
) -> AgentProcess:
    """A ``pipeline run`` on the bench's topics and database; with ``streams_file``, on
    that catalog's streams."""
    env = _agent_env(config, url, prefix, group, streams_file, route=route)
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


def _agent_env(
    config: Config,
    url: str,
    prefix: str,
    group: str,
    streams_file: Path | None,
    *,
    route: Route = DIRECT,
) -> dict[str, str]:
    """The environment of a ``pipeline`` command (run, replay) as an agent on the bench's
    topics and database, reaching it by ``route``; with ``streams_file``, on that catalog's
    streams."""
    streams = {} if streams_file is None else {"streams_file": str(streams_file)}
    env = testbed.agent_env(
        config.kafka.bootstrap_servers,
        route.agent_url(url),
        prefix,
        group,
        batch_max_records=config.batch_max_records,
        # Agents as deployed: each one's controller trusts Antigravity's key.
        control_public_keys=",".join(config.control_public_keys),
        **route.settings,
        **streams,
    )
    env.update(config.kafka.environment())  # over TLS and SASL when the config says so
    return env


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat: str, ticks_per_s: int = _TICKS_PER_S) -> float:
    """utime + stime, in seconds, from the text of ``/proc/<pid>/stat``. The command name
    (field 2) is in parentheses and may hold spaces or parentheses itself: the fields are
    counted from the last ``)``."""
    fields = stat.rpartition(")")[2].split()  # fields[0] is field 3, the state
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def per_million(cpu_s: float, rows: int) -> float:
    """CPU seconds per 1M rows; NaN when no row was counted."""
    return cpu_s / rows * 1_000_000 if rows > 0 else float("nan")


def _cpu_seconds(pid: int) -> float:
    return cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _in_fresh_databases(
    config: Config, catalog: Catalog, measure: Callable[[str], Awaitable[Measured]]
) -> list[Measured]:
    """``measure`` once per pass, each time against a fresh scratch database with the tables
    of ``catalog``."""
    results = []
    for _ in range(PASSES):
        async with _scratch_database(config, catalog) as url:
            results.append(await measure(url))
    return results


@contextlib.asynccontextmanager
async def _scratch_database(config: Config, catalog: Catalog) -> AsyncIterator[str]:
    """A fresh database on the same server, migrated with the tables of ``catalog`` and given
    their partitions by one maintenance pass, as `pipeline migrate` does (rows of today land
    in today's partition, not in DEFAULT), dropped afterwards.

    Autovacuum is off on its tables, in every run alike: a vacuum worker that lands in one
    run and not in another would decide a ratio more than the code does. (In production it
    stays on.)
    """
    name = f"bench_{uuid.uuid4().hex[:12]}"
    async with testbed.scratch_database(config.database_url, name, catalog=catalog) as url:
        migrator = await db.connect(testbed.as_migrator(url), config.db_session)
        try:
            tables = partition_maint.targets(catalog)
            pooled = config.db_session.pooler == "transaction"
            passes = await partition_maint.maintain(
                migrator, tables, datetime.now(UTC), lambda _: None, session_lock=not pooled
            )
            failed = [f"{r.table}: {r.error}" for r in passes if r.error is not None]
            if failed:  # the bench would measure rows in DEFAULT, not the production shape
                raise RuntimeError(f"the scratch database's partition maintenance failed: {failed}")
        finally:
            await migrator.close()
        conn = await db.connect(url, config.db_session)
        try:
            await db.migrate(conn, db.read_migrations(), catalog)
            # Plain tables and partitions only: a partitioned table stores nothing and takes no
            # storage parameter (PostgreSQL refuses autovacuum_enabled on it).
            plain = await conn.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r'"
            )
            for row in plain:
                await conn.execute(
                    f'ALTER TABLE "{row[0]}" SET (autovacuum_enabled = off, '
                    "toast.autovacuum_enabled = off)"
                )
        finally:
            await conn.close()
        yield url
