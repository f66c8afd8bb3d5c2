"""`pipeline bench --sdk`: what handing its records over costs an agent, measured in one run
(docs/performance.md, "The agents' side: `pipeline bench --sdk`").

:func:`run_sdk_bench` runs a simulated agent process per way of :data:`WAYS` and locks the
tables in the middle of each run; the process is :func:`agent_main` (``python -m
consumers.bench_sdk``), which imports only its own way's driver. The records, the schedule, the
statistics and the table are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from pipeline.records import AgentEvent, Metric, Record, StateChange

if TYPE_CHECKING:
    from pipeline.kafka_clients import KafkaSettings

#: The three ways, in the order they run after :data:`NOTHING`: an awaited INSERT per record
#: (what agents did before the pipeline), the same buffered into one executemany per batch,
#: and the SDK. NOTHING makes the same records and hands them to no one: the simulated agent's
#: own cost, which the others' net CPU leaves out.
NOTHING, OLD, BATCHED, SDK = "nothing", "old way", "batched", "SDK"
WAYS = (NOTHING, OLD, BATCHED, SDK)
#: The cost the SDK may have, as a share of the old way's: the project's success criterion.
BAR = 0.20
# Out of every ten records: seven metrics, two events, one state change.
_PATTERN = ("metrics",) * 7 + ("events",) * 2 + ("states",)
_AGENTS = 50
_STATES = ("idle", "working", "waiting", "done")
LAG_PROBE_S = 0.05  # how often the loop-lag probe asks to wake up: often, yet cheap


@dataclass(frozen=True)
class SdkPlan:
    rate: float  # records/s the simulated agent emits
    seconds: float  # how long it emits
    lock_at: float  # seconds into the run when the tables are locked
    lock_seconds: float  # how long they stay locked
    batch: int = 100  # the batched way: records per executemany (or one second's, if fewer)
    tick: float = 0.05  # the agent's work comes in ticks: rate * tick records each

    def __post_init__(self) -> None:
        if self.lock_at + self.lock_seconds > self.seconds:
            raise ValueError(
                f"the lock ({self.lock_seconds:g} s from {self.lock_at:g} s) must end within "
                f"the run ({self.seconds:g} s)"
            )


@dataclass(frozen=True)
class AgentSpec:
    """What a simulated agent process is told on stdin."""

    way: str
    rate: float
    seconds: float
    tick: float
    batch: int
    database_url: str  # the old and batched ways write here
    kafka: dict[str, Any]  # the SDK's KafkaSettings, as msgspec.to_builtins gives them
    topic_prefix: str
    seed: int = 1


@dataclass
class AgentReport:
    """What a simulated agent process measured, printed as JSON on its stdout.

    Times are ``time.monotonic()``, the system's clock that the bench process shares, so the
    bench can place each call against the lock it held.
    """

    way: str
    emitted: dict[str, int]  # records by stream
    scheduled: int  # records the schedule had for the run
    started: float
    ended: float  # when the last record was confirmed written or acknowledged
    cpu_s: float  # utime + stime from ``started`` to ``ended``
    cpu: list[tuple[float, float]]  # (when, utime + stime so far) at every tick, and at the end
    peak_rss_mb: float
    calls: list[tuple[float, float]]  # each emit call's (start, end)
    lags: list[tuple[float, float]]  # (when, how late the loop woke the probe, s)


@dataclass
class WayResult:
    """One way's numbers, as the table shows them."""

    way: str
    records: int
    scheduled: int
    cpu_ms_per_1k: float  # CPU ms per 1,000 records while the tables were not locked
    cpu_ms_per_1k_whole_run: float  # ... over the whole run, the lock's time included
    cpu_ms_per_1k_net: float  # cpu_ms_per_1k less NOTHING's: what handing the records over costs
    call_p50_ms: float
    call_p99_ms: float
    call_max_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    peak_rss_mb: float
    lock_records: int  # records whose emit call was made and returned while the tables were locked
    lock_scheduled: int  # what the schedule had for the lock's time
    lock_call_max_ms: float  # the longest call that overlapped the lock
    lock_lag_max_ms: float


# -- the simulated agent's records and schedule (pure) ----------------------------------------


def agent_records(
    seed: int, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Iterator[Record]:
    """The simulated agent's records, endless, the same for the same ``seed`` but for their
    times: record ``i`` is of stream ``_PATTERN[i % 10]``."""
    rng = msgspec_random(seed)
    versions = dict.fromkeys(range(_AGENTS), 0)
    for i in itertools.count():
        agent = next(rng) % _AGENTS
        agent_id = f"agent-{agent:03d}"
        stream = _PATTERN[i % len(_PATTERN)]
        if stream == "metrics":
            yield Metric(
                agent_id=agent_id,
                name=("cpu", "memory", "queue_depth", "latency_ms")[i % 4],
                value=(next(rng) % 10_000) / 100,
                ts=now(),
                labels={"host": f"host-{agent % 7}", "region": "eu-west"},
            )
        elif stream == "events":
            yield AgentEvent(
                event_id=uuid.UUID(int=next(rng) << 64 | i, version=4),
                agent_id=agent_id,
                kind=("task_started", "task_done", "retry")[i % 3],
                ts=now(),
                payload={"task": f"task-{i}", "attempt": 1 + i % 3},
            )
        else:
            versions[agent] += 1
            yield StateChange(
                agent_id=agent_id,
                state=_STATES[versions[agent] % len(_STATES)],
                version=versions[agent],
                ts=now(),
                data={"task": f"task-{i}"},
            )


def msgspec_random(seed: int) -> Iterator[int]:
    """Deterministic 64-bit numbers (splitmix64): cheap, and the same in every process."""
    state = seed & 0xFFFFFFFFFFFFFFFF
    while True:
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        yield z ^ (z >> 31)


def per_tick(rate: float, tick: float) -> int:
    """Records the agent emits per tick of its work."""
    return max(1, round(rate * tick))


def next_tick(start: float, now: float, tick: float) -> int:
    """The number of the first tick due after ``now``: an agent that was held up does not
    catch up, as the work it would have done in that time did not happen."""
    return math.floor((now - start) / tick) + 1


# -- the statistics and the table (pure) ------------------------------------------------------


def percentile(values: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile of ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def cpu_at(samples: Sequence[tuple[float, float]], when: float) -> float:
    """The CPU seconds spent by ``when``, from (time, CPU seconds so far) samples in time
    order: interpolated between the two around it, the nearest one outside them."""
    if when <= samples[0][0]:
        return samples[0][1]
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= when <= t1:
            return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)
    return samples[-1][1]


def summarise(report: AgentReport, lock: tuple[float, float], rate: float) -> WayResult:
    """One process's report as the table's numbers, the net CPU left for :func:`net_of_own`;
    ``lock`` is when the bench held the tables locked (monotonic start and end), ``rate`` the
    records/s the agent was to emit."""
    locked_from, locked_to = lock
    durations = [end - start for start, end in report.calls]
    records = sum(report.emitted.values())
    overlapping = [
        end - start for start, end in report.calls if start < locked_to and end > locked_from
    ]
    lags = [lag for _, lag in report.lags]
    lock_lags = [lag for when, lag in report.lags if locked_from <= when <= locked_to]
    # A call that began before the lock was granted may have been answered before it and
    # returned just after: only a call made and returned inside the lock emitted through it.
    lock_records = sum(locked_from <= start and end <= locked_to for start, end in report.calls)
    # The cost per record is the steady one: while the tables are locked, the old ways emit
    # next to nothing, and what their process spends then would weigh on too few records.
    lock_cpu = cpu_at(report.cpu, locked_to) - cpu_at(report.cpu, locked_from)
    steady = _per_1k(report.cpu_s - lock_cpu, records - lock_records)
    return WayResult(
        way=report.way,
        records=records,
        scheduled=report.scheduled,
        cpu_ms_per_1k=steady,
        cpu_ms_per_1k_whole_run=_per_1k(report.cpu_s, records),
        cpu_ms_per_1k_net=float("nan"),
        call_p50_ms=percentile(durations, 50) * 1000,
        call_p99_ms=percentile(durations, 99) * 1000,
        call_max_ms=max(durations, default=float("nan")) * 1000,
        lag_p99_ms=percentile(lags, 99) * 1000,
        lag_max_ms=max(lags, default=float("nan")) * 1000,
        peak_rss_mb=report.peak_rss_mb,
        lock_records=lock_records,
        lock_scheduled=round(rate * (locked_to - locked_from)),
        lock_call_max_ms=max(overlapping, default=0.0) * 1000,
        lock_lag_max_ms=max(lock_lags, default=0.0) * 1000,
    )


def net_of_own(results: Sequence[WayResult]) -> None:
    """Set each way's net CPU: its CPU per 1,000 records less :data:`NOTHING`'s."""
    own = next(r.cpu_ms_per_1k for r in results if r.way == NOTHING)
    for r in results:
        r.cpu_ms_per_1k_net = r.cpu_ms_per_1k - own


def _per_1k(cpu_s: float, records: int) -> float:
    """CPU ms per 1,000 records (NaN for none)."""
    return cpu_s * 1_000_000 / records if records > 0 else float("nan")


#: The costs the ratio row sets against each other: WayResult's field and its column.
_COSTS = (
    ("cpu_ms_per_1k_net", "CPU"),
    ("call_p50_ms", "call p50"),
    ("call_p99_ms", "call p99"),
    ("peak_rss_mb", "RSS"),
)


def ratios(results: Sequence[WayResult], over: str = SDK, under: str = OLD) -> dict[str, float]:
    """``over``'s cost against ``under``'s, by measure (:data:`_COSTS`): 0.20 is a fifth."""
    by_way = {r.way: r for r in results}
    top, bottom = by_way[over], by_way[under]
    return {name: _ratio(getattr(top, name), getattr(bottom, name)) for name, _ in _COSTS}


def _ratio(top: float, bottom: float) -> float:
    return top / bottom if bottom > 0 else float("nan")


def sdk_table(results: Sequence[WayResult], plan: SdkPlan) -> str:
    """The ways side by side, the SDK against the old way, and the verdict on CPU."""
    lines = [
        f"{plan.rate:,.0f} records/s for {plan.seconds:g} s; the tables locked for "
        f"{plan.lock_seconds:g} s from {plan.lock_at:g} s (call: an emit call's wall time, ms; "
        "lag: how late the event loop woke a timer, ms; CPU: ms per 1,000 records while the "
        "tables were not locked, net: less the simulated agent's own)",
        f"{'way':<9} {'records':>13} {'CPU':>6} {'net':>6} {'call p50':>9} {'call p99':>9} "
        f"{'call max':>9} {'lag p99':>8} {'lag max':>8} {'peak RSS':>9}   {'locked: records':>15} "
        f"{'call max':>9} {'lag max':>8}",
    ]
    for r in results:
        lines.append(
            f"{r.way:<9} {f'{r.records:,}/{r.scheduled:,}':>13} {r.cpu_ms_per_1k:>6.1f} "
            f"{r.cpu_ms_per_1k_net:>6.1f} {_ms(r.call_p50_ms):>9} {_ms(r.call_p99_ms):>9} "
            f"{_ms(r.call_max_ms):>9} {_ms(r.lag_p99_ms):>8} {_ms(r.lag_max_ms):>8} "
            f"{r.peak_rss_mb:>6.0f} MB   {f'{r.lock_records:,}/{r.lock_scheduled:,}':>15} "
            f"{_ms(r.lock_call_max_ms):>9} {_ms(r.lock_lag_max_ms):>8}"
        )
    found = ratios(results)
    lines.append(
        f"{'SDK/old':<9} {'':>13} {'':>6} {found['cpu_ms_per_1k_net']:>6.2f} "
        f"{found['call_p50_ms']:>9.3f} {found['call_p99_ms']:>9.3f} {'':>9} {'':>8} {'':>8} "
        f"{found['peak_rss_mb']:>9.2f}"
    )
    cpu = found["cpu_ms_per_1k_net"]
    verdict = "within" if cpu <= BAR else "ABOVE"
    lines.append(
        f"handing a record over costs the SDK {cpu:.0%} of the old way's CPU (net of the "
        f"simulated agent's own): {verdict} the bar of {BAR:.0%}"
    )
    return "\n".join(lines)


def _ms(value: float) -> str:
    """A duration in ms, to three places under 1 ms, two under 10, whole ms above (a lock's
    10 s shows as 10,003)."""
    if math.isnan(value):
        return "-"
    if value < 1:
        return f"{value:.3f}"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def sdk_json(results: Sequence[WayResult], plan: SdkPlan) -> dict[str, object]:
    """The plan, each way's numbers, and the SDK's costs against the old way's."""
    return {
        "plan": asdict(plan),
        "ways": {r.way: asdict(r) for r in results},
        "sdk_over_old": ratios(results),
        "bar": BAR,
    }


# -- the bench process: a simulated agent per way, the lock in the middle ---------------------

# The tables an agent writing to PostgreSQL itself has: the built-in streams' columns, its
# own keys (a state per agent, an event once), and nothing of the pipeline's bookkeeping.
_DIRECT_TABLES = {
    "states": "direct_states",
    "events": "direct_events",
    "metrics": "direct_metrics",
}
_DIRECT_DDL = (
    "CREATE TABLE direct_states (agent_id text PRIMARY KEY, state text NOT NULL, "
    "version bigint NOT NULL, ts timestamptz NOT NULL, data jsonb NOT NULL)",
    "CREATE TABLE direct_events (event_id uuid PRIMARY KEY, agent_id text NOT NULL, "
    "kind text NOT NULL, severity text NOT NULL, ts timestamptz NOT NULL, payload jsonb NOT NULL)",
    "CREATE TABLE direct_metrics (agent_id text NOT NULL, name text NOT NULL, "
    "value double precision NOT NULL, ts timestamptz NOT NULL, labels jsonb NOT NULL)",
    "CREATE INDEX direct_metrics_ts ON direct_metrics USING brin (ts)",
)
_INSERTS = {
    "states": "INSERT INTO direct_states AS t VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (agent_id) DO UPDATE SET state = EXCLUDED.state, version = EXCLUDED.version, "
    "ts = EXCLUDED.ts, data = EXCLUDED.data WHERE t.version < EXCLUDED.version",
    "events": "INSERT INTO direct_events VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (event_id) DO NOTHING",
    "metrics": "INSERT INTO direct_metrics VALUES ($1, $2, $3, $4, $5)",
}
# Where a DatabaseAgent would be writing the SDK's records: locked too, though nothing of the
# SDK's waits on PostgreSQL.
_PIPELINE_TABLES = ("agent_states", "system_events", "performance_metrics")

Report = Callable[[str], None]


async def run_sdk_bench(
    kafka: KafkaSettings, server_url: str, plan: SdkPlan, report: Report
) -> list[WayResult]:
    """Each way of :data:`WAYS` in its own simulated agent process, one after the other, each
    against a fresh database on the server of ``server_url`` (whose login may create one) and
    fresh topics; the tables locked in the middle of each run."""
    from pipeline import testbed

    results: list[WayResult] = []
    for way in WAYS:
        prefix = f"sdkbench{uuid.uuid4().hex[:8]}."
        await testbed.create_topics(kafka, prefix, 3)
        name = f"bench_sdk_{uuid.uuid4().hex[:12]}"
        async with testbed.scratch_database(server_url, name) as url:
            report(
                f"[{way}] {plan.rate:,.0f} records/s for {plan.seconds:g} s, tables locked "
                f"{plan.lock_seconds:g} s from {plan.lock_at:g} s"
            )
            spec = AgentSpec(
                way=way,
                rate=plan.rate,
                seconds=plan.seconds,
                tick=plan.tick,
                batch=plan.batch,
                database_url=url,
                kafka=msgspec.to_builtins(kafka),
                topic_prefix=prefix,
            )
            agent, lock = await _run_agent(url, spec, plan)
            await _check_delivered(kafka, url, prefix, agent)
        result = summarise(agent, lock, plan.rate)
        report(
            f"[{way}]   {result.records:,} of {result.scheduled:,} records, "
            f"{result.cpu_ms_per_1k:.1f} CPU ms per 1,000, call p50 {_ms(result.call_p50_ms)} ms "
            f"p99 {_ms(result.call_p99_ms)} ms; during the lock {result.lock_records:,} of "
            f"{result.lock_scheduled:,} records"
        )
        results.append(result)
    net_of_own(results)
    return results


async def _run_agent(
    url: str, spec: AgentSpec, plan: SdkPlan
) -> tuple[AgentReport, tuple[float, float]]:
    """Start the simulated agent, lock the tables ``plan.lock_at`` s after it is ready, and
    read its report: the report, and when the tables were locked (monotonic)."""
    import asyncpg

    from pipeline import db

    conn = await asyncpg.connect(url, timeout=10)
    try:
        for statement in _DIRECT_DDL:
            await conn.execute(statement)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumers.bench_sdk",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            # On stdin: the database URL holds a password, which argv would show to everyone.
            process.stdin.write(json.dumps(asdict(spec)).encode())
            await process.stdin.drain()
            process.stdin.close()
            ready = await asyncio.wait_for(process.stdout.readline(), 60)
            if ready != b"ready\n":
                raise RuntimeError(f"the simulated agent ({spec.way}) did not start: {ready!r}")
            await asyncio.sleep(plan.lock_at)
            tables = ", ".join((*_DIRECT_TABLES.values(), *_PIPELINE_TABLES))
            async with db.transaction(conn):
                await conn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
                locked_from = time.monotonic()
                await asyncio.sleep(plan.lock_seconds)
                # Before COMMIT is sent: the server releases the lock before this process
                # hears the answer, and a call stamped as ending inside it must have.
                locked_to = time.monotonic()
            out = await asyncio.wait_for(process.stdout.read(), plan.seconds + 120)
            code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if code != 0:
            raise RuntimeError(f"the simulated agent ({spec.way}) exited with {code}")
        found = json.loads(out)
        found["calls"] = [tuple(c) for c in found["calls"]]
        found["lags"] = [tuple(lag) for lag in found["lags"]]
        found["cpu"] = [tuple(sample) for sample in found["cpu"]]
        return AgentReport(**found), (locked_from, locked_to)
    finally:
        await conn.close()


async def _check_delivered(kafka: KafkaSettings, url: str, prefix: str, agent: AgentReport) -> None:
    """Every emitted record is where its way put it: a row per metric and per event in the
    direct tables, or a record in the SDK's topics. A way that lost records has no cost."""
    import asyncpg

    from pipeline import testbed
    from pipeline.catalog import load

    if agent.way == NOTHING:
        return
    if agent.way == SDK:
        stream_of_topic = load().topics(prefix)
        found: dict[str, int] = {}
        for (topic, _), end in (await testbed.end_offsets(kafka, prefix)).items():
            stream = stream_of_topic[topic]
            found[stream] = found.get(stream, 0) + end
        expected = {s: n for s, n in agent.emitted.items()}
        found = {s: found.get(s, 0) for s in expected}
    else:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            expected = {s: agent.emitted.get(s, 0) for s in ("events", "metrics")}
            found = {
                s: await conn.fetchval(f"SELECT count(*) FROM {_DIRECT_TABLES[s]}")
                for s in expected
            }
        finally:
            await conn.close()
    if found != expected:
        raise RuntimeError(f"{agent.way}: {found} records arrived where {expected} were emitted")


# -- the simulated agent process --------------------------------------------------------------


class _Way:
    """How a simulated agent hands its records over: ``emit`` one, ``finish`` once every one
    is written or acknowledged, ``close``."""

    async def emit(self, record: Record) -> None:
        """Hand ``record`` over: here, to no one (:data:`NOTHING`)."""

    async def finish(self) -> None:
        pass

    async def close(self) -> None:
        pass


def _row(record: Record) -> tuple[str, tuple[Any, ...]]:
    """The stream and the INSERT's arguments of a record (jsonb as text, asyncpg's default)."""
    encode = msgspec.json.encode
    if isinstance(record, Metric):
        return "metrics", (
            record.agent_id, record.name, record.value, record.ts, encode(record.labels).decode()
        )  # fmt: skip
    if isinstance(record, AgentEvent):
        return "events", (
            record.event_id, record.agent_id, record.kind, record.severity, record.ts,
            encode(record.payload).decode(),
        )  # fmt: skip
    if isinstance(record, StateChange):
        return "states", (
            record.agent_id, record.state, record.version, record.ts, encode(record.data).decode()
        )  # fmt: skip
    raise TypeError(f"the simulated agent emits no {type(record).__name__}")


class _Insert(_Way):
    """The old way: an INSERT per record, awaited."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def emit(self, record: Record) -> None:
        stream, args = _row(record)
        await self.conn.execute(_INSERTS[stream], *args)

    async def close(self) -> None:
        await self.conn.close()


class _Batched(_Insert):
    """Records buffered, and each batch written with an executemany per stream (atomic, each),
    awaited by the emit call that fills it (or that comes a second after the batch's first
    record)."""

    def __init__(self, conn: Any, batch: int) -> None:
        super().__init__(conn)
        self.batch = batch
        self.buffer: dict[str, list[tuple[Any, ...]]] = {}
        self.buffered = 0
        self.first = 0.0

    async def emit(self, record: Record) -> None:
        stream, args = _row(record)
        if not self.buffered:
            self.first = time.monotonic()
        self.buffer.setdefault(stream, []).append(args)
        self.buffered += 1
        if self.buffered >= self.batch or time.monotonic() - self.first >= 1.0:
            await self.finish()

    async def finish(self) -> None:
        if not self.buffered:
            return
        for stream, rows in self.buffer.items():
            await self.conn.executemany(_INSERTS[stream], rows)  # atomic, each
        self.buffer, self.buffered = {}, 0


class _Sdk(_Way):
    """The SDK: each record queued with ``send_nowait``, their acknowledgements awaited in
    bulk, a second's at a time, off the emitting path."""

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher
        self.pending: list[asyncio.Future[Any]] = []
        self.confirmer = asyncio.create_task(self._confirm())

    async def emit(self, record: Record) -> None:
        self.pending.append(await self.publisher.send_nowait(record))

    async def _confirm(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._confirm_pending()

    async def _confirm_pending(self) -> None:
        waiting, self.pending = self.pending, []
        await self.publisher.delivered(waiting)

    async def finish(self) -> None:
        self.confirmer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.confirmer
        await self._confirm_pending()

    async def close(self) -> None:
        await self.publisher.stop()


async def _connect_way(spec: AgentSpec) -> _Way:
    if spec.way == NOTHING:
        return _Way()
    if spec.way == SDK:
        from pipeline.kafka_clients import KafkaSettings
        from producers.publisher import AgentPublisher

        publisher = AgentPublisher(msgspec.convert(spec.kafka, KafkaSettings), spec.topic_prefix)
        await publisher.start()
        return _Sdk(publisher)
    import asyncpg

    conn = await asyncpg.connect(spec.database_url, timeout=10)
    return _Insert(conn) if spec.way == OLD else _Batched(conn, spec.batch)


async def _simulated_agent(spec: AgentSpec) -> AgentReport:
    from pipeline.records import stream_of

    way = await _connect_way(spec)
    records = agent_records(spec.seed)
    each = per_tick(spec.rate, spec.tick)
    ticks = math.ceil(spec.seconds / spec.tick)
    lags: list[tuple[float, float]] = []
    calls: list[tuple[float, float]] = []
    emitted: dict[str, int] = {}
    print("ready", flush=True)
    probe = asyncio.create_task(_probe_lag(lags))
    cpu_start, start = _cpu_s(), time.monotonic()
    cpu = [(start, 0.0)]
    n = 0
    while n < ticks:
        await asyncio.sleep(max(0.0, start + n * spec.tick - time.monotonic()))
        cpu.append((time.monotonic(), _cpu_s() - cpu_start))
        for record in itertools.islice(records, each):
            called = time.monotonic()
            await way.emit(record)
            calls.append((called, time.monotonic()))
            stream = stream_of(record)
            emitted[stream] = emitted.get(stream, 0) + 1
        n = max(n + 1, next_tick(start, time.monotonic(), spec.tick))
    await way.finish()
    ended, cpu_end = time.monotonic(), _cpu_s()
    cpu.append((ended, cpu_end - cpu_start))
    probe.cancel()
    await way.close()
    return AgentReport(
        way=spec.way,
        emitted=emitted,
        scheduled=each * ticks,
        started=start,
        ended=ended,
        cpu_s=cpu_end - cpu_start,
        cpu=cpu,
        peak_rss_mb=_peak_rss_mb(),
        calls=calls,
        lags=lags,
    )


async def _probe_lag(lags: list[tuple[float, float]]) -> None:
    """How late the event loop wakes a timer: the time something held it (CPU on the loop)."""
    while True:
        due = time.monotonic() + LAG_PROBE_S
        await asyncio.sleep(LAG_PROBE_S)
        now = time.monotonic()
        lags.append((now, max(0.0, now - due)))


def _cpu_s() -> float:
    """This process's utime + stime (every thread), as /proc/self/stat counts them."""
    times = os.times()
    return times.user + times.system


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_main() -> None:
    """``python -m consumers.bench_sdk``: one simulated agent, its spec on stdin, its report
    on stdout."""
    spec = AgentSpec(**json.loads(sys.stdin.read()))
    found = asyncio.run(_simulated_agent(spec))
    sys.stdout.write(json.dumps(asdict(found)) + "\n")


if __name__ == "__main__":
    agent_main()
