"""Network faults in mid-flight, through Toxiproxy (tests/toxiproxy.py), each judged by the
exactly-once oracle (harness.assert_caught_up_exactly_once) with three seeds: a PostgreSQL
connection cut in the middle of a COPY; a COMMIT whose answer never arrives; a connection
that goes silent without closing, to PostgreSQL and to Kafka; added latency under load; a
Kafka connection cut in the middle of a fetch and in the middle of the dead-letter send; the
control plane's reader and the lag probe cut off from Kafka. The negative control, an agent
that does not check its fence, must fail the lost-COMMIT test. docs/testing.md, "Network
faults: Toxiproxy", describes them and their wall times.

The agents reach PostgreSQL through a proxy of their test's own, and Kafka through a broker of
this module's own (:func:`proxied_kafka`) whose listeners advertise the proxies' addresses,
so that every connection after the bootstrap goes through them too. The tests' own clients
(producing, the oracle) connect directly. The agents are ``pipeline run`` processes with a
hook (tests/integration/hooked_agent.py) that adds a toxic at an exact point of a batch, where
one added from outside would land by chance.

The timeouts the tests rely on are the agent's documented settings (docs/operations.md,
pipeline/config.py), lowered for speed: ``db_command_timeout_s`` 3 s (default 60),
``session_timeout_ms`` 6000 (default 30 000, the smallest allowed), ``lag_refresh_s`` 1 s
(default 5). Each test's docstring names those it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from consumers.antigravity import Antigravity
from pipeline import kafka_clients, testbed
from pipeline.catalog import load as load_catalog
from pipeline.control import (
    Assign,
    BatchLimits,
    generate_key_pair,
    write_public_key_file,
)
from pipeline.devstack import kafka, kafka_versions, pgbouncer
from pipeline.devstack.kafka import ProxiedListener
from pipeline.devstack.processes import choose_port, stop_pid
from pipeline.devstack.stack import cache_root
from pipeline.testbed import AgentProcess
from tests.builtin_streams import STREAM_BY_NAME
from tests.integration import broken_fence_agent, hooked_agent
from tests.integration.harness import (
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    consumer_group,
    create_topics,
    fleet_traffic,
    produce,
    produce_paced,
    scrape,
    stored_offsets,
    until,
    wait_caught_up,
)
from tests.integration.hooked_agent import Hook, Toxic, hook_env, read_report
from tests.integration.test_poison import _dlq_letters
from tests.toxiproxy import Proxy, Toxiproxy

pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("network-faults")]

SEEDS = [1, 2, 3]
COMMAND_TIMEOUT_S = 3.0
SESSION_TIMEOUT_MS = 6000
# The latency test's minute under load: seed 1 runs the whole minute; seeds 2 and 3, whose
# traffic differs but whose latency does not, run 20 s: the batch in flight when it began, a
# batch or two wholly under it, then the recovery (each of them costs 35 s instead of 80).
# With 10 s, the batch in flight was once the only one to commit under it.
LATENCY_S = {1: 60.0, 2: 20.0, 3: 20.0}


# -- the proxies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxiedKafka:
    """A broker of this module's own: ``direct`` is the tests' way in; the agents bootstrap
    from ``agents``, the hooked agents' controller and lag probe from ``side``: each proxy
    fronts a listener of its own, which advertises the proxy's address."""

    direct: str
    agents: Proxy
    side: Proxy


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def proxied_kafka(
    toxiproxy: Toxiproxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxiedKafka]:
    release = kafka_versions.release(kafka_versions.chosen(os.environ))
    broker = kafka.KafkaBroker(
        tmp_path_factory.mktemp("kafka"), kafka.resolve_jars(cache_root(), release), release
    )
    port = choose_port(0)
    controller = choose_port(0, taken={port})
    agents_port = choose_port(0, taken={port, controller})
    side_port = choose_port(0, taken={port, controller, agents_port})
    agents = toxiproxy.proxy("kafka-agents", f"127.0.0.1:{agents_port}")
    side = toxiproxy.proxy("kafka-side", f"127.0.0.1:{side_port}")
    with _environment(KAFKA_HEAP_OPTS="-Xms128m -Xmx384m"):
        pid = broker.start(
            port,
            controller,
            proxied=[
                ProxiedListener("AGENTS", agents_port, agents.listen),
                ProxiedListener("SIDE", side_port, side.listen),
            ],
        )
    try:
        broker.wait_ready(f"127.0.0.1:{port}", timeout=90)
        yield ProxiedKafka(f"127.0.0.1:{port}", agents, side)
    finally:
        stop_pid(pid, signal.SIGTERM, timeout=30)
        agents.delete()
        side.delete()


@dataclass(frozen=True)
class Case:
    """One test's world: the module's broker and proxies, a proxy to PostgreSQL of its own,
    its database (``database_url``, the administrator's, direct), its topics' prefix (also
    the group) and its directory."""

    net: ProxiedKafka
    pg: Proxy
    database_url: str
    prefix: str
    tmp_path: Path

    @property
    def kafka(self) -> str:
        return self.net.direct

    def env(self, **settings: object) -> dict[str, str]:
        """An agent's environment: Kafka and PostgreSQL through the proxies; batches of 500
        and the lowered timeouts of the module's docstring, unless ``settings`` say else."""
        url = pgbouncer.through(testbed.as_agent(self.database_url), self.pg.port)
        return agent_env(
            self.net.agents.listen,
            url,
            self.prefix,
            self.prefix,
            **{
                "batch_max_records": 500,
                "session_timeout_ms": SESSION_TIMEOUT_MS,
                "db_command_timeout_s": COMMAND_TIMEOUT_S,
                **settings,
            },
        )

    async def ingested(self) -> int:
        return sum((await stored_offsets(self.database_url, self.prefix, self.prefix)).values())

    async def wait_ingesting(self, records: int) -> None:
        async def ingesting() -> bool:
            return await self.ingested() >= records

        await until(ingesting, within=60, what=f"{records} records ingested")

    async def assert_exactly_once(self, sent: list[Sent], within: float = 120) -> None:
        await assert_caught_up_exactly_once(
            self.database_url, self.kafka, self.prefix, sent, within=within
        )


@pytest.fixture
def case(
    proxied_kafka: ProxiedKafka,
    toxiproxy: Toxiproxy,
    database_url: str,
    unique: str,
    tmp_path: Path,
) -> Iterator[Case]:
    """The agents' PostgreSQL (the server or pooler they would connect to) behind a proxy of
    this test's own; the Kafka proxies without a toxic again after the test."""
    address = urlsplit(testbed.as_agent(database_url)).netloc.rsplit("@", 1)[-1]
    pg = toxiproxy.proxy(f"postgres-{unique}", address)
    try:
        yield Case(proxied_kafka, pg, database_url, f"{unique}.", tmp_path)
    finally:
        pg.delete()
        for proxy in (proxied_kafka.agents, proxied_kafka.side):
            for toxic in proxy.toxics():
                proxy.remove(toxic["name"])


# -- helpers ----------------------------------------------------------------------------------


def _metrics_address() -> str:
    return f"127.0.0.1:{choose_port(0)}"


def _log(agent: AgentProcess) -> str:
    assert agent.log_path is not None
    return agent.log_path.read_text()


@contextlib.asynccontextmanager
async def _running(
    env: dict[str, str], log: Path, command: list[str] = hooked_agent.COMMAND
) -> AsyncIterator[AgentProcess]:
    agent = AgentProcess(env, log)
    agent.command = command
    agent.start()
    try:
        yield agent
    finally:
        agent.kill()


async def _wait_report(path: Path, agent: AgentProcess) -> dict[str, object]:
    found: dict[str, object] = {}

    async def reported() -> bool:
        nonlocal found
        assert agent.alive(), _log(agent)[-4000:]
        found = read_report(path) or {}
        return bool(found)

    await until(reported, within=90, what="the hook firing and its statement ending")
    return found


async def _assert_stops_cleanly(agent: AgentProcess) -> None:
    assert agent.alive(), _log(agent)[-4000:]
    assert await asyncio.to_thread(agent.stop) == 0, _log(agent)[-4000:]


def _connections(pid: int, port: int) -> set[int]:
    """The local ports of process ``pid``'s established TCP connections to ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if fields[9] in inodes and remote_port == port and fields[3] == "01":  # ESTABLISHED
            found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found


@contextlib.contextmanager
def _silenced(proxy: Proxy) -> Iterator[None]:
    """Toxiproxy's ``timeout`` toxic of 0 on both directions: nothing passes, nothing is
    closed, until the block ends; then the proxy closes the connections it held silent."""
    with (
        proxy.toxic("timeout", "upstream", timeout=0),
        proxy.toxic("timeout", "downstream", timeout=0),
    ):
        yield


# -- a PostgreSQL connection cut in the middle of a COPY ---------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_postgres_connection_cut_in_the_middle_of_a_copy_is_retried_once(
    case: Case, seed: int
) -> None:
    """Toxiproxy's ``limit_data`` on the agent's side of the connection, added as the agent
    starts the COPY into performance_metrics of its n-th batch with 70 such rows or more,
    closes the connection after a seed's 200-2000 bytes, fewer than the COPY sends: the
    server sees the COPY's data end and rolls the transaction back, and the agent's COPY
    fails with the connection lost.
    Relies on no timeout (a closed connection is noticed at once): the agent retries the
    batch on a new connection after its backoff (``retry_max_backoff_s``), its
    compare-and-set holds (nothing was committed), and the batch lands once; nothing fenced."""
    rng = random.Random(seed)
    nth, cut_after = rng.randint(2, 4), rng.randrange(200, 2000)
    await create_topics(case.kafka, case.prefix, partitions=3)
    report = case.tmp_path / "hook.json"
    metrics = _metrics_address()
    hook = Hook(
        api=case.pg.api,
        proxy=case.pg.name,
        at="copy",
        nth=nth,
        min_rows=70,
        toxic=Toxic("limit_data", "upstream", {"bytes": cut_after}),
        report=str(report),
    )
    env = hook_env(case.env(metrics_address=metrics), hook)
    async with _running(env, case.tmp_path / "agent.log") as agent:
        traffic = fleet_traffic(12_000, seed=seed)
        sending = asyncio.create_task(produce_paced(case.kafka, case.prefix, traffic, over=6.0))
        seen = await _wait_report(report, agent)
        # A binary COPY row takes at least 2 bytes and 4 per column: the cut lands inside.
        rows = seen["rows"]
        assert isinstance(rows, int) and rows * (2 + 4 * 7) > cut_after, seen
        assert "ConnectionDoesNotExistError" in str(seen["error"]), seen
        await case.assert_exactly_once(await sending)
        retries = scrape(metrics, "pipeline_retries_total")
        print(f"cut after {cut_after} bytes of a COPY of {rows} rows: {seen}; retries {retries}")
        assert retries >= 1
        assert scrape(metrics, "pipeline_fenced_batches_total") == 0
        await _assert_stops_cleanly(agent)


# -- a COMMIT whose answer never arrives --------------------------------------------------------


@contextlib.asynccontextmanager
async def _commit_answer_lost(
    case: Case, seed: int, command: list[str]
) -> AsyncIterator[tuple[AgentProcess, str, dict[str, object], list[Sent]]]:
    """The lost-COMMIT scenario, run by ``command``: Toxiproxy's ``timeout`` on the server's
    side of the connection (nothing the server sends arrives; the connection is closed after
    1 s), added just before the agent sends the COMMIT of its n-th batch that writes 50 rows
    or more into performance_metrics. Yields the agent, its /metrics address, the hook's
    report and what was sent."""
    rng = random.Random(seed)
    await create_topics(case.kafka, case.prefix, partitions=3)
    report = case.tmp_path / "hook.json"
    metrics = _metrics_address()
    hook = Hook(
        api=case.pg.api,
        proxy=case.pg.name,
        at="commit",
        nth=rng.randint(2, 5),
        min_rows=50,
        toxic=Toxic("timeout", "downstream", {"timeout": 1000}),
        report=str(report),
    )
    env = hook_env(case.env(metrics_address=metrics), hook)
    async with _running(env, case.tmp_path / "agent.log", command) as agent:
        traffic = fleet_traffic(12_000, seed=seed)
        sending = asyncio.create_task(produce_paced(case.kafka, case.prefix, traffic, over=6.0))
        seen = await _wait_report(report, agent)
        assert "ConnectionDoesNotExistError" in str(seen["error"]), seen
        # The answer was lost, not the COMMIT: the batch's offsets moved.
        stored = await stored_offsets(case.database_url, case.prefix, case.prefix)
        moves = seen["moves"]
        assert isinstance(moves, list)
        for topic, partition, _, new in moves:
            assert stored[(topic.removeprefix(case.prefix), partition)] >= new, (seen, stored)
        yield agent, metrics, seen, await sending


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_commit_whose_answer_never_arrives_is_found_committed_through_the_fence(
    case: Case, seed: int
) -> None:
    """The COMMIT reaches the server and commits; its answer is dropped and the connection
    closed a second later, before ``db_command_timeout_s`` (3 s) would end the wait. The agent
    sees the connection lost, cannot know whether the batch committed, and retries it on a
    new connection: its compare-and-set expects the offsets the lost COMMIT moved on, misses,
    and the batch is dropped as fenced (its partitions re-read from the database). Exactly
    one fence, and every record once."""
    async with _commit_answer_lost(case, seed, hooked_agent.COMMAND) as (
        agent,
        metrics,
        seen,
        sent,
    ):
        await case.assert_exactly_once(sent)
        fenced = scrape(metrics, "pipeline_fenced_batches_total")
        retries = scrape(metrics, "pipeline_retries_total")
        print(
            f"lost the answer to the COMMIT of {seen['moves']}: fenced {fenced}, retries {retries}"
        )
        assert fenced == 1
        assert retries >= 1
        await _assert_stops_cleanly(agent)


async def test_the_oracle_catches_an_agent_that_does_not_check_its_fence_after_a_lost_commit(
    case: Case,
) -> None:
    """The negative control: the same lost COMMIT with tests/integration/broken_fence_agent.py,
    whose compare-and-set misses without a word. Its retry writes the committed batch again:
    the metrics rows it copied are in performance_metrics twice, and the oracle must say so."""
    async with _commit_answer_lost(case, 1, broken_fence_agent.COMMAND) as (_, _, _, sent):
        with pytest.raises(
            AssertionError, match="performance_metrics: rows ingested more than once"
        ):
            await case.assert_exactly_once(sent)


# -- a connection that goes silent without closing ----------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_silent_postgres_connection_times_out_and_the_batch_lands_once(
    case: Case, seed: int
) -> None:
    """Toxiproxy's ``timeout`` of 0 on both directions of the agent's PostgreSQL connection:
    nothing passes and nothing closes. The statement in flight waits ``db_command_timeout_s``
    (3 s) and fails as transient; the agent terminates the connection and connects again, each
    new connection silent too (a connection attempt waits up to 10 s,
    ``pipeline.db_session.Session.connect_timeout``), backing off (``retry_max_backoff_s``).
    The silence ends a seed's 0-3 s after the agent noticed it (its retry counted); the proxy
    then closes the connections it held. Nothing is written while silent; then every record
    once, with no restart."""
    rng = random.Random(seed)
    await create_topics(case.kafka, case.prefix, partitions=3)
    metrics = _metrics_address()
    async with _running(case.env(metrics_address=metrics), case.tmp_path / "agent.log") as agent:
        traffic = fleet_traffic(10_000, seed=seed)
        sending = asyncio.create_task(produce_paced(case.kafka, case.prefix, traffic, over=10.0))
        await case.wait_ingesting(1_000)
        retries = scrape(metrics, "pipeline_retries_total")
        with _silenced(case.pg):
            silent_at = time.monotonic()

            async def noticed() -> bool:
                return scrape(metrics, "pipeline_retries_total") > retries

            await until(noticed, within=COMMAND_TIMEOUT_S + 20, what="the statement timing out")
            noticed_after = time.monotonic() - silent_at
            held = await case.ingested()  # what was in flight has ended: it timed out
            await asyncio.sleep(rng.uniform(0.0, 3.0))  # the rest of the silence, from the seed
            assert await case.ingested() == held, "written through a silent connection?"
            silent_for = time.monotonic() - silent_at
        assert not sending.done(), "records must still arrive when the silence ends"
        await case.assert_exactly_once(await sending)
        print(
            f"silent for {silent_for:.1f}s, noticed after {noticed_after:.1f}s, retries "
            f"{scrape(metrics, 'pipeline_retries_total') - retries}"
        )
        await _assert_stops_cleanly(agent)


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_silent_kafka_connection_gets_the_member_evicted_and_it_rejoins(
    case: Case, seed: int
) -> None:
    """Toxiproxy's ``timeout`` of 0 on both directions of the agent's Kafka connections:
    fetches, heartbeats, the offset mirror and the lag probe get no answer, and nothing
    closes. The batch already fetched still commits (PostgreSQL is fine). The broker evicts
    the member once ``session_timeout_ms`` (6 s) passes without a heartbeat; the silence ends
    a seed's 0-3 s after the group is empty, and the proxy closes the connections it held.
    The agent's clients connect again, it rejoins, is assigned its partitions again and
    positions them from the database: every record once, with no restart. Not waited for:
    aiokafka's own request timeout (``request_timeout_ms``, 40 s, not an agent setting),
    after which the client would give up a silent connection by itself."""
    rng = random.Random(seed)
    await create_topics(case.kafka, case.prefix, partitions=3)
    async with _running(case.env(), case.tmp_path / "agent.log") as agent:
        traffic = fleet_traffic(14_000, seed=seed)
        sending = asyncio.create_task(produce_paced(case.kafka, case.prefix, traffic, over=14.0))
        await case.wait_ingesting(1_000)

        async def members(count: int) -> bool:
            state, found = await consumer_group(case.kafka, case.prefix)
            return len(found) == count and state == ("Stable" if count else "Empty")

        await until(lambda: members(1), within=30, what="the agent in a stable group")
        with _silenced(case.net.agents):
            silent_at = time.monotonic()
            await until(lambda: members(0), within=30, what="the silent member evicted")
            evicted_after = time.monotonic() - silent_at
            await asyncio.sleep(rng.uniform(0.0, 3.0))  # the rest of the silence, from the seed
            silent_for = time.monotonic() - silent_at
        await until(lambda: members(1), within=60, what="the agent back in a stable group")
        rejoined_after = time.monotonic() - silent_at - silent_for
        assert evicted_after > SESSION_TIMEOUT_MS / 1000 * 0.8, "evicted before its session?"
        await case.assert_exactly_once(await sending)
        print(
            f"silent for {silent_for:.1f}s, evicted after {evicted_after:.1f}s, rejoined "
            f"{rejoined_after:.1f}s after the silence"
        )
        await _assert_stops_cleanly(agent)


# -- latency ------------------------------------------------------------------------------------


def _batch_seconds(metrics: str) -> tuple[float, float, float]:
    """The agent's committed batches: how many, their seconds and their records in all."""
    return (
        scrape(metrics, "pipeline_batch_duration_seconds_count"),
        scrape(metrics, "pipeline_batch_duration_seconds_sum"),
        scrape(metrics, "pipeline_batch_records_sum"),
    )


@pytest.mark.parametrize("seed", SEEDS)
async def test_added_latency_slows_ingestion_loses_nothing_and_the_lag_recovers(
    case: Case, seed: int
) -> None:
    """Toxiproxy's ``latency``: 200 ms each way on PostgreSQL, 100 ms each way on Kafka, for
    ``LATENCY_S[seed]`` s (a minute for seed 1) under a steady 1000 records/s, with batches
    of at most 2000 records (``batch_max_records``). A batch's transaction is at least ten
    round trips (BEGIN, its settings, the compare-and-set, a COPY's two, a staged stream's
    four, COMMIT), 4 s or more at 0.4 s each: at most 500 records/s, so the lag grows.
    Nothing times out (``db_command_timeout_s`` 3 s is above any one statement's round trips;
    the heartbeats' 0.2 s is far below ``session_timeout_ms``), so nothing is retried or
    fenced: the agent only goes slower. Once the latency is gone the lag recovers: caught up,
    every record once."""
    rate, before_s, after_s = 1000, 5.0, 5.0
    latency_s = LATENCY_S[seed]
    await create_topics(case.kafka, case.prefix, partitions=3)
    metrics = _metrics_address()
    env = case.env(metrics_address=metrics, batch_max_records=2000)
    async with _running(env, case.tmp_path / "agent.log") as agent:
        over = before_s + latency_s + after_s
        traffic = fleet_traffic(int(rate * over), seed=seed)
        sending = asyncio.create_task(
            produce_paced(case.kafka, case.prefix, traffic, over=over, chunks=int(over * 2))
        )
        await case.wait_ingesting(rate)
        with (
            case.pg.toxic("latency", "upstream", latency=200),
            case.pg.toxic("latency", "downstream", latency=200),
            case.net.agents.toxic("latency", "upstream", latency=100),
            case.net.agents.toxic("latency", "downstream", latency=100),
        ):
            started = time.monotonic()
            ingested_at_start = await case.ingested()
            # The batch in flight when the latency began made part of its round trips without
            # it: the batches timed are the ones after it, begun under the latency.
            in_flight = _batch_seconds(metrics)[0]

            async def committed() -> bool:
                return _batch_seconds(metrics)[0] > in_flight

            await until(committed, within=latency_s, what="the batch in flight to commit")
            batches_before = _batch_seconds(metrics)
            # The latency's length: this wait IS the fault.
            await asyncio.sleep(max(0.0, started + latency_s - time.monotonic()))
            ingested_under_latency = await case.ingested() - ingested_at_start
            batches_during = _batch_seconds(metrics)
        lifted = time.monotonic()
        assert not sending.done(), "records must still arrive when the latency ends"
        sent = await sending
        ends = await wait_caught_up(
            case.database_url, case.kafka, case.prefix, case.prefix, within=120
        )
        recovered_after = time.monotonic() - lifted
        await case.assert_exactly_once(sent)
        count, seconds, records = (
            during - before for during, before in zip(batches_during, batches_before, strict=True)
        )
        print(
            f"{latency_s:.0f}s of latency: {ingested_under_latency} records ingested "
            f"({ingested_under_latency / (lifted - started):.0f}/s, offered {rate}/s) in "
            f"{count:.0f} batches of {seconds / max(count, 1):.1f}s and "
            f"{records / max(count, 1):.0f} records on average; caught up "
            f"{recovered_after:.1f}s after the latency ended; {sum(ends.values())} records"
        )
        assert ingested_under_latency < rate * latency_s / 2, "throughput did not degrade?"
        assert ingested_under_latency > 0, "nothing ingested under latency"
        assert count >= 1 and seconds / count >= 10 * 0.4 * 0.9
        assert scrape(metrics, "pipeline_retries_total") == 0
        assert scrape(metrics, "pipeline_fenced_batches_total") == 0
        await _assert_stops_cleanly(agent)


# -- Kafka connections cut in the middle of a fetch and of the dead-letter send -------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_kafka_connection_cut_in_the_middle_of_a_fetch_loses_nothing(
    case: Case, seed: int
) -> None:
    """Toxiproxy's ``limit_data`` on the broker's side of the agent's Kafka connections:
    each is closed after a seed's 10-60 kB from the broker. The test adds it while the agent
    is caught up and idle, then sends a burst of 5000 records (about 0.7 MB): the fetch
    response that carries them is cut inside. aiokafka drops the connection and fetches again
    on a new one, cut too while the toxic is there; once one of the agent's connections from
    before has been cut, the toxic is removed. Relies on no timeout (a closed connection is
    noticed at once): every record once, with no restart."""
    rng = random.Random(seed)
    cut_after = rng.randrange(10_000, 60_000)
    await create_topics(case.kafka, case.prefix, partitions=3)
    traffic = fleet_traffic(7_000, seed=seed)
    async with _running(case.env(), case.tmp_path / "agent.log") as agent:
        sent = await produce(case.kafka, case.prefix, traffic[:2000])
        await wait_caught_up(case.database_url, case.kafka, case.prefix, case.prefix, within=60)
        before = _connections(agent.pid, case.net.agents.port)
        assert before, "the agent's connections to the broker"
        with case.net.agents.toxic("limit_data", "downstream", bytes=cut_after):
            cut_at = time.monotonic()
            sent += await produce(case.kafka, case.prefix, traffic[2000:])

            async def one_cut() -> bool:
                return not before <= _connections(agent.pid, case.net.agents.port)

            await until(one_cut, within=30, what="a connection of the agent's cut", every=0.05)
            ingested_while_cut = await case.ingested() - 2000
            cut_after_s = time.monotonic() - cut_at
        await case.assert_exactly_once(sent)
        print(
            f"cut after {cut_after} bytes from the broker, {cut_after_s:.2f}s after the burst "
            f"began; {ingested_while_cut} of its 5000 records ingested meanwhile"
        )
        assert ingested_while_cut < 5000
        await _assert_stops_cleanly(agent)


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_kafka_connection_cut_in_the_middle_of_the_dead_letter_send(
    case: Case, seed: int
) -> None:
    """Toxiproxy's ``limit_data`` on the agent's side of its Kafka connections, added by the
    hook just before the agent sends the dead letters of a batch and removed once that send
    has ended: each connection is closed after a seed's 2-20 kB, fewer than one letter (a
    50 kB record that does not decode). The send fails within ``db_command_timeout_s`` (3 s,
    the bound on the dead-letter acknowledgements), the batch is retried and its letters sent
    again: on the DLQ topic at least once (docs/exactly-once.md), in dead_letters exactly
    once, every good record once."""
    rng = random.Random(seed)
    await create_topics(case.kafka, case.prefix, partitions=3)
    traffic = fleet_traffic(8_000, seed=seed)
    for at in sorted(rng.sample(range(1000, len(traffic)), 3)):
        traffic[at] = Outgoing(
            STREAM_BY_NAME["metrics"], f"p{at}".encode(), b"{" + b"x" * 50_000, "DecodeError"
        )
    report = case.tmp_path / "hook.json"
    hook = Hook(
        api=case.net.agents.api,
        proxy=case.net.agents.name,
        at="dead_letters",
        toxic=Toxic("limit_data", "upstream", {"bytes": rng.randrange(2_000, 20_000)}),
        report=str(report),
    )
    async with _running(hook_env(case.env(), hook), case.tmp_path / "agent.log") as agent:
        sending = asyncio.create_task(produce_paced(case.kafka, case.prefix, traffic, over=6.0))
        seen = await _wait_report(report, agent)
        assert "did not acknowledge" in str(seen["error"]), seen
        sent = await sending
        await case.assert_exactly_once(sent)
        poison = {(s.topic, s.partition, s.offset) for s in sent if s.poison}
        on_topic = await _dlq_letters(case.kafka, case.prefix, len(poison))
        assert set(on_topic) == poison
        print(f"the dead-letter send cut: {seen}")
        await _assert_stops_cleanly(agent)


# -- the control plane's reader and the lag probe cut off from Kafka ------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_control_reader_and_the_lag_probe_cut_off_from_kafka_recover(
    case: Case, seed: int
) -> None:
    """The hooked agent's controller (reading the control topic, sending heartbeats) and its
    lag probe reach the broker through a second proxy, silenced (``timeout`` of 0, both
    ways); ingestion goes on, a seed's 2000-4000 records at least. A command
    sent meanwhile is not applied; the silence lasts until a lag lookup and a heartbeat have
    failed too. Once it ends (the proxy closes the connections it held) the controller reads
    and applies the command, its heartbeats reach the status topic again, and the lag probe
    measures again. Relies on: ``lag_refresh_s`` 1 s (a lookup gives up after 2 s), the
    controller's heartbeat every 3 s and its status sends' 10 s bound."""
    rng = random.Random(seed)
    await create_topics(case.kafka, case.prefix, partitions=3)
    private, public = generate_key_pair()
    write_public_key_file(case.tmp_path / "antigravity.pub", public)
    antigravity = Antigravity(
        kafka_clients.kafka_settings(case.kafka), prefix=case.prefix, private_key=private
    )
    metrics = _metrics_address()
    env = case.env(
        metrics_address=metrics,
        lag_refresh_s=1,
        control_public_keys=case.tmp_path / "antigravity.pub",
    )
    hook = Hook(side_bootstrap=case.net.side.listen)
    async with _running(hook_env(env, hook), case.tmp_path / "agent.log") as agent:
        traffic = fleet_traffic(16_000, seed=seed)
        sending = asyncio.create_task(produce_paced(case.kafka, case.prefix, traffic, over=16.0))
        await case.wait_ingesting(1_000)

        async def heartbeat_since(moment: float, **expect: object) -> bool:
            return any(
                h.at.timestamp() > moment and all(getattr(h, k) == v for k, v in expect.items())
                for h in await antigravity.fleet(case.prefix)
            )

        await until(lambda: heartbeat_since(0), within=30, what="a heartbeat")
        with _silenced(case.net.side):
            cut_at, held = time.time(), await case.ingested()
            command = Assign(
                version=1, streams=load_catalog().names, limits=BatchLimits(batch_max_records=400)
            )
            delivery = await antigravity.send(case.prefix, command, wait_s=0.5)
            assert delivery.acks == {}, "acknowledged by a controller cut off?"
            moved_on = rng.randrange(2_000, 4_000)

            async def ingestion_goes_on() -> bool:
                return await case.ingested() >= held + moved_on

            await until(ingestion_goes_on, within=60, what=f"{moved_on} records ingested")

            async def both_failed() -> bool:
                log = _log(agent)
                return "measuring lag failed" in log and "did not take 1 message" in log

            await until(both_failed, within=30, what="the lag probe and a heartbeat failing")
            assert scrape(metrics, "pipeline_control_applied_seq") == 0
            lifted = time.time()
        await until(
            lambda: heartbeat_since(lifted, applied_seq=1, assignment_version=1),
            within=60,
            what="a heartbeat after the silence, the command applied",
        )

        async def probe_measures_again() -> bool:
            return "measuring lag works again" in _log(agent)

        await until(probe_measures_again, within=30, what="the lag probe measuring again")
        assert scrape(metrics, "pipeline_control_applied_seq") == 1
        await case.assert_exactly_once(await sending)
        print(
            f"cut off for {lifted - cut_at:.1f}s while {moved_on}+ records were ingested; "
            "the command applied and the lag measured again after it"
        )
        await _assert_stops_cleanly(agent)
