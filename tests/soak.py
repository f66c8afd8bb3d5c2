"""The soak run (`make soak MINUTES=N`), to see a slow leak: docs/testing.md, "The soak run:
`make soak`", says what it does and how it judges.

    python -m tests.soak --minutes 30 --rate 20000 --seed 1 --out soak-results

On a stack of its own (Kafka and PostgreSQL under a fresh home, stopped and deleted at the
end), two ``pipeline run`` agents ingest the simulated fleet's traffic, reaching PostgreSQL
through Toxiproxy (tests/toxiproxy.py), while a seeded fault is injected every minute and
Antigravity sends a signed command every minute; every 10 s each agent's RSS, open file
descriptors, asyncio tasks and database connections are sampled. At the end: the
exactly-once oracle over every record in the log, the verdict on growth
(tests/soak_trend.py), ``soak.png`` and ``soak.json`` in the output directory. Exit status 1
when the oracle or a verdict fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from pipeline import kafka_clients, testbed
from pipeline.devstack import Stack, kafka, pgbouncer, postgres
from pipeline.devstack.processes import choose_port, stop_pid
from pipeline.devstack.stack import cache_root
from pipeline.records import Record
from producers.publisher import AgentPublisher, PublishError
from producers.simulator import FleetSimulator
from tests.builtin_streams import STREAM_BY_TYPE, STREAMS
from tests.integration.harness import APPEND_TABLE, kafka_committed, scrape
from tests.soak_trend import RULES, Point, Trend, trend
from tests.toxiproxy import Proxy, Stream, Toxiproxy

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "soak."
GROUP = "soak"
DATABASE = "soak"
MEASURES = (
    "rss_mib",
    "allocated_blocks",
    "malloc_in_use_mib",
    "open_fds",
    "asyncio_tasks",
    "db_connections",
)
# The agents' settings that bound how long a fault can hold them: a silent connection is
# given up after the command timeout, a killed member's partitions move after the session
# timeout (both lowered from their defaults so that a fault a minute does not pile up).
AGENT_SETTINGS = {
    "topic_partitions": 6,
    "session_timeout_ms": 10_000,
    "db_command_timeout_s": 10,
    "db_idle_in_transaction_timeout_s": 20,
}


@dataclass(frozen=True)
class Settings:
    minutes: float = 30.0
    rate: float = 20_000.0  # records/s of the built-in mix
    seed: int = 1
    agents: int = 2
    warmup_s: float = 300.0  # growth is judged after it
    settle_s: float = 120.0  # and, in a restarted agent, after this long
    sample_every_s: float = 10.0
    fault_every_s: float = 60.0
    control_every_s: float = 60.0
    faults: tuple[str, ...] = ()  # kinds, in order; empty: every kind, shuffled by the seed
    judged: tuple[str, ...] = MEASURES  # the measures whose growth fails the run
    agent_command: tuple[str, ...] = ()  # in place of `pipeline run` (a leaking agent, say)
    drain_s: float = 900.0  # how long the agents may take to catch up at the end


# -- the faults --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Soak:
    """The running soak's servers, proxy and agents: what the faults act on."""

    stack: Stack
    proxy: Proxy
    agents: list[Agent]
    rng: random.Random


Fault = Callable[[Soak], Awaitable[str]]


async def _toxic_for(proxy: Proxy, seconds: float, kind: str, stream: Stream, **attrs: int) -> None:
    name = proxy.add(kind, stream, name=f"soak_{kind}_{stream}", **attrs)
    try:
        await asyncio.sleep(seconds)  # the toxic's lifetime IS the fault
    finally:
        proxy.remove(name)


async def pg_cut_mid_copy(soak: Soak) -> str:
    """The agents' PostgreSQL connections closed after a few more kilobytes from the agent:
    under load, in the middle of a COPY's data."""
    limit = soak.rng.randrange(16_384, 262_144)
    await _toxic_for(soak.proxy, 5.0, "limit_data", "upstream", bytes=limit)
    return f"connections cut after {limit} bytes to PostgreSQL, for 5 s"


async def pg_lost_answers(soak: Soak) -> str:
    """PostgreSQL's answers dropped (the commands reach it): a COMMIT done whose answer is
    lost, until the agents' command timeout gives the connection up."""
    seconds = float(AGENT_SETTINGS["db_command_timeout_s"]) + 2
    await _toxic_for(soak.proxy, seconds, "timeout", "downstream", timeout=0)
    return f"PostgreSQL's answers dropped for {seconds:g} s"


async def pg_silent(soak: Soak) -> str:
    """Both directions silent, the connections left open."""
    up = soak.proxy.add("timeout", "upstream", name="soak_silent_up", timeout=0)
    try:
        await _toxic_for(soak.proxy, 15.0, "timeout", "downstream", timeout=0)
    finally:
        soak.proxy.remove(up)
    return "PostgreSQL connections silent for 15 s"


async def pg_latency(soak: Soak) -> str:
    latency = soak.rng.randrange(100, 400)
    await _toxic_for(soak.proxy, 30.0, "latency", "downstream", latency=latency, jitter=50)
    return f"{latency} ms (+-50) added to PostgreSQL's answers for 30 s"


async def kill_agent(soak: Soak) -> str:
    agent = soak.rng.choice(soak.agents)
    old = agent.process.pid
    agent.process.kill()
    agent.process.start()
    return f"kill -9 {agent.name} (pid {old}), restarted as pid {agent.process.pid}"


async def broker_restart(soak: Soak) -> str:
    pid = kafka.pidfile(soak.stack.home / "kafka").live_pid()
    assert pid is not None, "the soak's broker is not running"
    await asyncio.to_thread(stop_pid, pid, signal.SIGTERM, 60.0)  # controlled shutdown
    down = soak.rng.uniform(2.0, 6.0)
    await asyncio.sleep(down)  # the agents meet an absent broker for a while
    await asyncio.to_thread(soak.stack.up, lambda _: None)
    return f"Kafka broker stopped (pid {pid}), down {down:.1f} s, restarted"


async def postgres_restart(soak: Soak) -> str:
    pid = postgres.pidfile(soak.stack.home / "postgres").live_pid()
    assert pid is not None, "the soak's PostgreSQL is not running"
    await asyncio.to_thread(stop_pid, pid, signal.SIGINT, 60.0)  # fast shutdown
    down = soak.rng.uniform(2.0, 6.0)
    await asyncio.sleep(down)
    await asyncio.to_thread(soak.stack.up, lambda _: None)
    return f"PostgreSQL stopped (pid {pid}), down {down:.1f} s, restarted"


#: Every kind of fault, by name. The network faults act on the agents' PostgreSQL connections
#: through Toxiproxy.
FAULTS: dict[str, Fault] = {
    "pg_cut_mid_copy": pg_cut_mid_copy,
    "pg_lost_answers": pg_lost_answers,
    "pg_silent": pg_silent,
    "pg_latency": pg_latency,
    "kill_agent": kill_agent,
    "broker_restart": broker_restart,
    "postgres_restart": postgres_restart,
}


def fault_schedule(kinds: tuple[str, ...], count: int, rng: random.Random) -> list[str]:
    """``count`` fault kinds: ``kinds`` in their order, again and again; with none given,
    every kind once per round, each round shuffled by ``rng``."""
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    schedule: list[str] = []
    while len(schedule) < count:
        round_ = list(kinds or FAULTS)
        if not kinds:
            rng.shuffle(round_)
        schedule += round_
    return schedule[:count]


# -- the agents and their samples ------------------------------------------------------------


@dataclass
class Agent:
    name: str
    metrics_address: str
    process: testbed.AgentProcess


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)


def _sockets(pid: int) -> tuple[int, set[str]]:
    """The number of open file descriptors of ``pid`` and the inodes of its sockets."""
    count, inodes = 0, set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        count += 1
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return count, inodes


def _connections_to(port: int, inodes: set[str]) -> int:
    """How many of the sockets ``inodes`` are established TCP connections to ``port``."""
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                established = fields[3] == "01"
                if established and fields[9] in inodes:
                    found += int(fields[2].rsplit(":", 1)[1], 16) == port
    return found


def sample_agent(agent: Agent, pg_port: int) -> dict[str, float] | None:
    """One sample of a running agent: None when it is not running (being restarted)."""
    pid = agent.process.pid
    try:
        fds, inodes = _sockets(pid)
        values = {
            "rss_mib": _rss_mib(pid),
            "open_fds": float(fds),
            "db_connections": float(_connections_to(pg_port, inodes)),
        }
    except (ProcessLookupError, FileNotFoundError):
        return None
    try:
        values["asyncio_tasks"] = scrape(agent.metrics_address, "pipeline_asyncio_tasks")
        values["allocated_blocks"] = scrape(
            agent.metrics_address, "pipeline_python_allocated_blocks"
        )
        values["malloc_in_use_mib"] = (
            scrape(agent.metrics_address, "pipeline_malloc_in_use_bytes") / 2**20
        )
    except OSError:  # starting, or stopped between the reads
        return None
    return values


@dataclass
class Run:
    """What the soak records, for soak.json and the plot."""

    settings: Settings
    started_at: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)  # t, agent, pid, measures
    progress: list[dict[str, Any]] = field(default_factory=list)  # t, produced, ingested
    faults: list[dict[str, Any]] = field(default_factory=list)  # t, until, kind, what
    commands: list[dict[str, Any]] = field(default_factory=list)  # t, name, exit status
    exits: list[dict[str, Any]] = field(default_factory=list)  # agents that exited on their own
    produced: dict[str, int] = field(default_factory=dict)  # acknowledged, per stream
    unconfirmed: int = 0  # sends whose outcome the producer never learned
    publisher_restarts: int = 0
    disk_mib: dict[str, float] = field(default_factory=dict)  # the servers' data at the end
    oracle: dict[str, Any] = field(default_factory=dict)
    trends: dict[str, dict[str, Any]] = field(default_factory=dict)  # "agent-0 rss_mib": Trend
    ok: bool = False

    def points(self, agent: str, measure: str) -> list[Point]:
        return [
            Point(s["t"], s["pid"], s[measure])
            for s in self.samples
            if s["agent"] == agent and measure in s
        ]


# -- the producer ----------------------------------------------------------------------------


async def produce(bootstrap: str, rate: float, seed: int, run: Run, stop: asyncio.Event) -> None:
    """The simulated fleet's records at ``rate``/s until ``stop``, through broker restarts.

    One fleet (one generator) for the whole run, so that every state and config version and
    every event id is sent once. A send the broker does not acknowledge in time is not sent
    again: the log then holds it once or not at all, and the oracle judges the database
    against the log. After a failure the publisher is made again and the pacing starts over
    (no burst to catch up)."""
    fleet = FleetSimulator(seed=seed)
    counts = dict.fromkeys((s.name for s in STREAMS), 0)
    run.produced = counts
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    _quiet_about_abandoned_sends(loop)
    try:
        await _publish(bootstrap, rate, fleet, run, stop)
    finally:
        loop.set_exception_handler(handler)


async def _publish(
    bootstrap: str, rate: float, fleet: FleetSimulator, run: Run, stop: asyncio.Event
) -> None:
    counts = run.produced
    tick = 0.05
    most = max(1, int(rate * tick * 4))  # behind, it catches up a few ticks at a time
    loop = asyncio.get_running_loop()
    previous: list[tuple[Record, asyncio.Future[Any]]] = []

    async def delivered() -> None:
        await publisher.delivered(f for _, f in previous)
        for record, _ in previous:
            counts[STREAM_BY_TYPE[type(record)].name] += 1
        previous.clear()

    while not stop.is_set():
        try:
            async with AgentPublisher(bootstrap, PREFIX, send_timeout=10.0) as publisher:
                start, queued = loop.time(), 0
                while not stop.is_set():
                    due = int(rate * (loop.time() - start + tick))
                    records = fleet.next_records(min(most, due - queued), datetime.now(UTC))
                    futures = await publisher.send_many(records)
                    queued += len(records)
                    await delivered()
                    previous += zip(records, futures, strict=True)
                    await asyncio.sleep(max(0.0, start + queued / rate - loop.time()))
                await delivered()
        except PublishError:
            run.publisher_restarts += 1
            run.unconfirmed += len(previous)
            previous.clear()
            await asyncio.sleep(1.0)


def _quiet_about_abandoned_sends(loop: asyncio.AbstractEventLoop) -> None:
    """The sends a failed publisher abandons fail with a PublishError nobody awaits (those
    queued by a ``send_many`` that timed out are not even returned to the caller): counted
    as unconfirmed, not reported one by one as forgotten futures."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not isinstance(context.get("exception"), PublishError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


# -- the oracle --------------------------------------------------------------------------------


async def oracle(admin_url: str, ends: testbed.Offsets) -> dict[str, Any]:
    """Every record in the data topics' logs is in its table exactly once, nothing else is
    there, nothing was dead-lettered, and the stored offsets are the end offsets.

    The producer's sends that timed out may or may not be in the log, so the log, which
    only this run's producer writes, is the reference: each partition's offsets 0 to its end
    offset are data records (an idempotent producer, no transactions), so a table holds
    them exactly once when its rows of that partition number the end offset, are all
    distinct, and lie between 0 and the end offset. Done in SQL: millions of rows."""
    problems: list[str] = []
    tables: dict[str, int] = {}
    conn = await asyncpg.connect(admin_url, timeout=30)
    try:
        for stream in STREAMS:
            table = APPEND_TABLE[stream.name]
            rows = {
                r["p"]: r
                for r in await conn.fetch(
                    f"SELECT src_partition AS p, count(*) AS n, "
                    f"count(DISTINCT src_offset) AS d, min(src_offset) AS lo, "
                    f"max(src_offset) AS hi FROM {table} GROUP BY 1",
                    timeout=1800,
                )
            }
            topic = testbed.data_topics(PREFIX)[STREAMS.index(stream)]
            partitions = {p: end for (t, p), end in ends.items() if t == topic}
            tables[table] = sum(r["n"] for r in rows.values())
            for p in sorted(set(rows) | set(partitions)):
                end = partitions.get(p, 0)
                r = rows.get(p)
                n, d = (r["n"], r["d"]) if r else (0, 0)
                if n != d:
                    problems.append(f"{table} partition {p}: {n - d} rows ingested twice")
                if r and (r["lo"] < 0 or r["hi"] >= end):
                    problems.append(f"{table} partition {p}: offsets beyond the log's {end}")
                if d != end:
                    problems.append(f"{table} partition {p}: {end} in the log, {d} ingested")
        letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
        if letters:
            problems.append(f"{letters} dead letters, for a traffic with no bad record")
        stored = await testbed.stored_offsets(conn, GROUP)
        if any(stored.get(tp, 0) != end for tp, end in ends.items()) or set(stored) - set(ends):
            behind = {f"{t}/{p}": (stored.get((t, p), 0), e) for (t, p), e in ends.items()}
            problems.append(f"stored offsets are not the end offsets: {behind}")
    finally:
        await conn.close()
    return {
        "holds": not problems,
        "problems": problems,
        "records_in_log": sum(ends.values()),
        "rows": tables,
    }


# -- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _logins_of(stack: Stack) -> Iterator[None]:
    """testbed's logins set to the soak stack's for the run, and put back after it (a pytest
    worker runs other tests after this one), with no pooler."""
    saved = (testbed._InUse.logins, testbed._InUse.admin, testbed._InUse.pooler)
    testbed.use_logins(stack.logins(), stack.admin_url())
    testbed._InUse.pooler = None
    try:
        yield
    finally:
        testbed._InUse.logins, testbed._InUse.admin, testbed._InUse.pooler = saved


@contextlib.asynccontextmanager
async def _servers(home: Path) -> AsyncIterator[Stack]:
    stack = Stack(home=home)
    await asyncio.to_thread(stack.up, lambda line: print(f"soak: {line}", flush=True))
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.down, True, lambda _: None)


async def run_soak(settings: Settings, out: Path) -> Run:
    """The whole soak, on servers of its own under a fresh home (deleted at the end); the
    agents' logs go to ``out``. Its record, judged (:func:`save` writes it)."""
    run = Run(settings, started_at=datetime.now(UTC).isoformat(timespec="seconds"))
    rng = random.Random(settings.seed)
    root = cache_root() / "soak"
    for directory in (root, out):
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        home = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        cleanup.callback(shutil.rmtree, home, ignore_errors=True)
        toxiproxy = cleanup.enter_context(Toxiproxy(home / "toxiproxy"))
        async with _servers(home / "stack") as stack:
            with _logins_of(stack):
                await _run(stack, toxiproxy, run, rng, out=out)
    run.trends = judge(run)
    run.ok = passed(run)
    return run


def passed(run: Run) -> bool:
    """The oracle holds and no judged measure of any agent grows (``run.trends``)."""
    return run.oracle.get("holds", False) and not any(
        t["grows"] for key, t in run.trends.items() if key.split()[1] in run.settings.judged
    )


def save(run: Run, out: Path) -> None:
    """``out``/soak.json (every sample, fault, command and verdict) and ``out``/soak.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(dataclasses.asdict(run), indent=1, default=str))
    plot(run, out / "soak.png")


async def _run(
    stack: Stack, toxiproxy: Toxiproxy, run: Run, rng: random.Random, *, out: Path
) -> None:
    settings = run.settings
    endpoints = stack.endpoints()
    bootstrap = endpoints.kafka_bootstrap
    admin_url = stack.admin_url()
    pg_address = admin_url.split("@", 1)[1].split("/", 1)[0]
    proxy = toxiproxy.proxy("soak-postgres", pg_address)
    private_key, public_key = stack.control_keys()
    async with testbed.scratch_database(admin_url, DATABASE) as url:
        await testbed.create_topics(
            endpoints.kafka, PREFIX, int(AGENT_SETTINGS["topic_partitions"])
        )
        agent_url = pgbouncer.through(testbed.as_agent(url), proxy.port)
        agents = []
        for i in range(settings.agents):
            address = f"127.0.0.1:{choose_port(0)}"
            env = testbed.agent_env(
                bootstrap,
                agent_url,
                PREFIX,
                GROUP,
                metrics_address=address,
                instance_id=f"agent-{i}",
                control_public_keys=public_key,
                **AGENT_SETTINGS,
            )
            log = out / f"agent-{i}.log"
            log.unlink(missing_ok=True)
            process = testbed.AgentProcess(env, log)
            if settings.agent_command:
                process.command = list(settings.agent_command)
            agents.append(Agent(f"agent-{i}", address, process))
        control_env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": testbed.as_agent(url),
            "PIPELINE_TOPIC_PREFIX": PREFIX,
            "PIPELINE_GROUP_ID": GROUP,
            "PIPELINE_CONTROL_PRIVATE_KEY_FILE": str(private_key),
            "PIPELINE_CONTROL_PUBLIC_KEYS": str(public_key),
        }
        control_env.pop("PIPELINE_MIGRATE_DATABASE_URL", None)
        soak = Soak(stack, proxy, agents, rng)
        stop = asyncio.Event()
        began = time.monotonic()
        for agent in agents:
            agent.process.start()
        producing = asyncio.create_task(produce(bootstrap, settings.rate, settings.seed, run, stop))
        tasks = [
            asyncio.create_task(
                _sample(soak, run, began, stop, pg_port=proxy.port, admin_url=admin_url)
            ),
            asyncio.create_task(_inject(soak, run, began, stop, rng)),
            asyncio.create_task(_control(settings, run, began, control_env, stop)),
        ]
        try:
            # A task that fails (a fault that could not be injected, say) ends the run now.
            done, _ = await asyncio.wait(
                [producing, *tasks],
                timeout=settings.minutes * 60,
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for task in done:
                task.result()
            stop.set()
            await producing
            await asyncio.gather(*tasks)
            print(
                f"soak: {settings.minutes:g} min done; waiting for the agents to catch up",
                flush=True,
            )
            ends = await _caught_up(admin_url, bootstrap, settings.drain_s, run, began)
            run.oracle.update(await oracle(testbed.database_url_for(admin_url, DATABASE), ends))
            run.disk_mib = {
                "kafka": _size_mib(stack.home / "kafka"),
                "postgres": _size_mib(postgres.data_dir(stack.home / "postgres")),
            }
            await testbed.stop_agents([a.process for a in agents])
            run.oracle["agent_exit_codes"] = [a.process.wait(1) for a in agents]
        finally:
            stop.set()
            for task in [producing, *tasks]:
                task.cancel()
            await asyncio.gather(producing, *tasks, return_exceptions=True)
            for agent in agents:
                agent.process.kill()
    proxy.delete()


def _size_mib(directory: Path) -> float:
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.lstat().st_blocks * 512  # Kafka's index files are sparse
    return round(total / 2**20, 1)


async def _stored(url: str) -> testbed.Offsets:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await testbed.stored_offsets(conn, GROUP)
    finally:
        await conn.close()


async def _sample(
    soak: Soak, run: Run, began: float, stop: asyncio.Event, *, pg_port: int, admin_url: str
) -> None:
    """Every ``sample_every_s``: each agent's measures, and the run's progress (records
    acknowledged, ingested, and Kafka's committed offsets never ahead of the database's)."""
    every = run.settings.sample_every_s
    admin_db = testbed.database_url_for(admin_url, DATABASE)
    bootstrap = soak.stack.endpoints().kafka_bootstrap
    for tick in range(10**9):
        await _until(began + tick * every, stop)
        if stop.is_set():
            return
        t = round(time.monotonic() - began, 1)
        for agent in soak.agents:
            _supervise(agent, run, t)
            values = await asyncio.to_thread(sample_agent, agent, pg_port)
            if values is not None:
                run.samples.append(
                    {"t": t, "agent": agent.name, "pid": agent.process.pid, **values}
                )
        # During a fault the servers may not answer: that sample of the progress is skipped.
        with contextlib.suppress(Exception):
            # Kafka's first: its offsets follow the database's, so read the other way round
            # a commit in between would look like Kafka running ahead.
            committed = await asyncio.wait_for(kafka_committed(bootstrap, GROUP, ""), 5)
            stored = await asyncio.wait_for(_stored(admin_db), 5)
            ahead = {f"{k[0]}/{k[1]}": o for k, o in committed.items() if o > stored.get(k, 0)}
            run.progress.append(
                {
                    "t": t,
                    "produced": sum(run.produced.values()),
                    "ingested": sum(stored.values()),
                    "kafka_ahead": ahead,
                }
            )


def _supervise(agent: Agent, run: Run, t: float) -> None:
    """An agent that exited on its own is recorded, with the last line it wrote, and started
    again, as a supervisor (systemd, Kubernetes) would."""
    proc = agent.process.proc
    if proc is None or proc.poll() is None:
        return
    log = agent.process.log_path
    said = log.read_text(errors="replace").strip().splitlines()[-1:] if log else []
    run.exits.append(
        {"t": t, "agent": agent.name, "pid": proc.pid, "exit": proc.returncode, "said": said}
    )
    print(f"soak: {t / 60:5.1f} min  {agent.name} exited {proc.returncode}: {said}", flush=True)
    agent.process.start()


async def _until(moment: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, moment - time.monotonic()))


async def _inject(
    soak: Soak, run: Run, began: float, stop: asyncio.Event, rng: random.Random
) -> None:
    """A fault every ``fault_every_s`` from then on, each run to its end before the next;
    none in the last ``fault_every_s / 2``."""
    settings = run.settings
    duration = settings.minutes * 60
    count = max(0, int((duration - settings.fault_every_s / 2) // settings.fault_every_s))
    for n, kind in enumerate(fault_schedule(settings.faults, count, rng), 1):
        await _until(began + n * settings.fault_every_s, stop)
        if stop.is_set():
            return
        t = time.monotonic() - began
        print(f"soak: {t / 60:5.1f} min  fault {n}: {kind}", flush=True)
        what = await FAULTS[kind](soak)
        run.faults.append(
            {
                "t": round(t, 1),
                "until": round(time.monotonic() - began, 1),
                "kind": kind,
                "what": what,
            }
        )


async def _control(
    settings: Settings, run: Run, began: float, env: dict[str, str], stop: asyncio.Event
) -> None:
    """Antigravity at work: a signed checkpoint command every ``control_every_s``, half a
    period after each fault, waiting for the live agents' acks (`pipeline control`)."""
    for n in range(1, 10**9):
        await _until(began + (n - 0.5) * settings.control_every_s, stop)
        if stop.is_set():
            return
        t = time.monotonic() - began
        name = f"soak-{n}"
        command = [sys.executable, "-m", "pipeline.cli", "control", "checkpoint", name]
        done = await asyncio.to_thread(
            subprocess.run,
            [*command, "--wait", "20"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        run.commands.append(
            {"t": round(t, 1), "name": name, "exit": done.returncode, "said": done.stdout[-300:]}
        )


async def _caught_up(
    admin_url: str, bootstrap: str, within: float, run: Run, began: float
) -> testbed.Offsets:
    """Wait until every partition's stored offset is its end offset; the end offsets."""
    kafka_settings = kafka_clients.kafka_settings(bootstrap)
    ends = await testbed.end_offsets(kafka_settings, PREFIX)
    admin_db = testbed.database_url_for(admin_url, DATABASE)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stored = await _stored(admin_db)
        if all(stored.get(tp, 0) == end for tp, end in ends.items()):
            run.oracle["drained_after_s"] = round(
                time.monotonic() - began - run.settings.minutes * 60, 1
            )
            return ends
        await asyncio.sleep(1.0)
    return ends  # the oracle names what is behind


# -- the verdict and the plot ------------------------------------------------------------------


def judge(run: Run) -> dict[str, dict[str, Any]]:
    verdicts: dict[str, dict[str, Any]] = {}
    for i in range(run.settings.agents):
        agent = f"agent-{i}"
        for measure in MEASURES:
            found: Trend = trend(
                run.points(agent, measure),
                RULES[measure],
                after=run.settings.warmup_s,
                settle=run.settings.settle_s,
            )
            verdicts[f"{agent} {measure}"] = {**dataclasses.asdict(found), "grows": found.grows}
    return verdicts


def value_at(run: Run, agent: str, measure: str, t: float) -> float | None:
    """The agent's sample nearest to ``t`` seconds."""
    points = run.points(agent, measure)
    if not points:
        return None
    return min(points, key=lambda p: abs(p.t - t)).value


def plot(run: Run, path: Path) -> None:
    """The measures over time, one line per agent (broken at restarts), the faults as
    vertical lines, the warm-up shaded: like `pipeline bench`'s PNG, with matplotlib."""
    import matplotlib  # noqa: PLC0415 - the bench extra, only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    titles = {
        "rss_mib": "RSS (MiB)",
        "allocated_blocks": "Python's allocated blocks",
        "malloc_in_use_mib": "malloc's bytes in use (MiB)",
        "open_fds": "open file descriptors",
        "asyncio_tasks": "asyncio tasks",
        "db_connections": "database connections",
    }
    figure, axes = plt.subplots(2, 3, figsize=(18, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, measure in zip(axes.flat, MEASURES, strict=True):
        for i in range(run.settings.agents):
            agent = f"agent-{i}"
            points = run.points(agent, measure)
            segments: dict[int, list[Point]] = {}
            for p in points:
                segments.setdefault(p.pid, []).append(p)
            for n, segment in enumerate(segments.values()):
                ax.plot(
                    [p.t / 60 for p in segment],
                    [p.value for p in segment],
                    color=colors[i % len(colors)],
                    label=agent if n == 0 else None,
                )
            verdict = run.trends.get(f"{agent} {measure}")
            if verdict and verdict["grows"] and measure in run.settings.judged:
                ax.set_facecolor("#fde8e8")
        for fault in run.faults:
            ax.axvline(fault["t"] / 60, color="grey", linestyle=":", linewidth=0.8)
        ax.axvspan(0, run.settings.warmup_s / 60, color="grey", alpha=0.12)
        ax.set_title(titles[measure])
        ax.set_xlim(0, run.settings.minutes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    top = axes[0][0]
    for fault in run.faults:
        top.annotate(
            fault["kind"],
            (fault["t"] / 60, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            va="top",
            ha="right",
            color="grey",
        )
    for ax in axes[1]:
        ax.set_xlabel("minutes (shaded: warm-up, not judged; dotted: a fault)")
    axes[0][0].legend(loc="lower right")
    passed = "PASS" if run.ok else "FAIL"
    figure.suptitle(
        f"soak {run.settings.minutes:g} min, {run.settings.rate:,.0f} records/s target, "
        f"seed {run.settings.seed}: {passed} "
        f"(oracle {'holds' if run.oracle.get('holds') else 'FAILS'})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(run: Run) -> str:
    """The numbers the closing note asks for."""
    s = run.settings
    duration = s.minutes * 60
    lines = [f"soak: {s.minutes:g} min, target {s.rate:,.0f} records/s, seed {s.seed}"]
    produced = sum(run.produced.values())
    lines.append(
        f"records: {produced:,} acknowledged ({produced / duration:,.0f}/s), "
        f"{run.oracle.get('records_in_log', 0):,} in the log, "
        f"{sum(run.oracle.get('rows', {}).values()):,} rows; {run.unconfirmed} sends "
        f"unconfirmed, publisher made again {run.publisher_restarts} time(s)"
    )
    if run.disk_mib:
        lines.append(
            f"disk at the end: Kafka {run.disk_mib['kafka']:,.0f} MiB, "
            f"PostgreSQL {run.disk_mib['postgres']:,.0f} MiB"
        )
    if "drained_after_s" in run.oracle:
        lines.append(f"caught up {run.oracle['drained_after_s']:g} s after the traffic stopped")
    kinds: dict[str, int] = {}
    for fault in run.faults:
        kinds[fault["kind"]] = kinds.get(fault["kind"], 0) + 1
    lines.append(f"faults: {len(run.faults)} ({', '.join(f'{k} {n}' for k, n in kinds.items())})")
    lines.append(f"agents that exited on their own (restarted): {len(run.exits)}")
    lines += [
        f"  {e['t'] / 60:.1f} min {e['agent']} exit {e['exit']}: {e['said']}" for e in run.exits
    ]
    acked = sum(c["exit"] == 0 for c in run.commands)
    lines.append(
        f"control commands: {len(run.commands)} sent, {acked} acknowledged by every live agent"
    )
    if run.progress:
        behind = max(run.progress, key=lambda p: p["produced"] - p["ingested"])
        lines.append(
            f"lag: at most {behind['produced'] - behind['ingested']:,} records acknowledged and "
            f"not yet ingested (at {behind['t'] / 60:.1f} min)"
        )
    ahead = [p for p in run.progress if p["kafka_ahead"]]
    lines.append(
        f"Kafka's committed offsets ahead of the database's: in {len(ahead)} of "
        f"{len(run.progress)} samples"
    )
    at = [min(s.warmup_s, duration), duration]
    lines.append(
        f"{'':<24}"
        + "".join(f"{f'at {t / 60:g} min':>14}" for t in at)
        + f"{'slope/min':>11}{'1st half':>10}{'2nd half':>10}{'peak rise':>11}{'limit':>11}"
        + "  verdict"
    )
    for key, v in run.trends.items():
        agent, measure = key.split()
        values = [value_at(run, agent, measure, t) for t in at]
        cells = "".join(f"{'-' if x is None else f'{x:,.1f}':>14}" for x in values)
        said = "GROWS" if v["grows"] else "flat" if v["judged"] else "not judged (too short)"
        if measure not in s.judged:
            said += " (reported, not judged)"
        fitted = f"{v['slope_per_min']:>11.3f}{v['early']:>10.1f}{v['late']:>10.1f}"
        fitted += f"{v['peak_rise']:>11.1f}"
        lines.append(f"{key:<24}{cells}{fitted}{v['limit']:>11,.1f}  {said}")
    oracle_line = "holds" if run.oracle.get("holds") else f"FAILS: {run.oracle.get('problems')}"
    lines.append(f"oracle: {oracle_line}; agents' exit codes {run.oracle.get('agent_exit_codes')}")
    unjudged = [k for k, v in run.trends.items() if not v["judged"]]
    note = f" ({len(unjudged)} series not judged: too short)" if unjudged else ""
    lines.append(f"verdict: {'PASS' if run.ok else 'FAIL'}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20_000.0, help="records/s (20000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes not judged (5)")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds (60)")
    parser.add_argument(
        "--faults",
        default="",
        help=f"comma list, in order (default: all, shuffled): {','.join(FAULTS)}",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "soak-results")
    parser.add_argument(
        "--agent-module",
        help="run the agents as `python -m MODULE` in place of `pipeline run` (the negative "
        "control: tests.integration.leaky_agent)",
    )
    args = parser.parse_args(argv)
    settings = Settings(
        minutes=args.minutes,
        rate=args.rate,
        seed=args.seed,
        warmup_s=args.warmup * 60,
        fault_every_s=args.fault_every,
        faults=tuple(k for k in args.faults.split(",") if k),
        agent_command=(sys.executable, "-m", args.agent_module) if args.agent_module else (),
    )
    fault_schedule(settings.faults, 0, random.Random())  # unknown kinds fail here, named
    # The soak's own broker: a smaller heap than the development stack's, unless told.
    os.environ.setdefault("KAFKA_HEAP_OPTS", "-Xms256m -Xmx768m")
    run = asyncio.run(run_soak(settings, args.out))
    save(run, args.out)
    print(summary(run))
    print(f"soak: {args.out / 'soak.png'}, {args.out / 'soak.json'}")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
