"""Faults injected into real servers and real agent processes, each judged by the
exactly-once oracle (harness.assert_caught_up_exactly_once): a stalled instance (stopped
inside its ingest transaction), a frozen database backend, a table locked for longer than the
session timeout, and randomized SIGKILLs with configurable seeds. The negative control (a
broken agent the oracle must reject) is in chaos_negative_control.py, run by `make chaos`: it
depends on where the kills land.

Signals go only to processes this test started (agents by pid), or to the one PostgreSQL
backend of the agent under test (found in pg_stat_activity by this test's database name and
application_name 'database-agent'), and every SIGSTOP has its SIGCONT in a ``finally``.

``CHAOS_SEEDS="1 2 3 4 5"`` runs the randomized kill scenario once per seed (``make chaos
SEEDS=5``, which also runs the negative control); one seed by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pipeline.devstack.processes import choose_port
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    AgentProcess,
    Outgoing,
    Sent,
    agent_env,
    assert_caught_up_exactly_once,
    consumer_group,
    create_topics,
    end_offsets,
    fleet_traffic,
    produce_paced,
    scrape,
    stored_offsets,
    until,
)

pytestmark = pytest.mark.timeout(300)

SEEDS = [int(s) for s in os.environ.get("CHAOS_SEEDS", "3").split()]
# The negative control's seed (chaos_negative_control.py): its kill moments land while the
# broken agent holds offsets committed to Kafka and not to the database (seeds 1 and 2 were
# seen to miss that window).
NEGATIVE_SEED = 3
BROKEN_AGENT = [sys.executable, "-m", "tests.integration.broken_agent"]
RSS_CAP_KB = 400 * 1024


# -- helpers ----------------------------------------------------------------------------------


def _metrics_address() -> str:
    return f"127.0.0.1:{choose_port(0)}"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _local_tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` has open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _agent_backends(database_url: str, database: str) -> list[asyncpg.Record]:
    """The agents' PostgreSQL backends on this test's database, oldest first."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return list(
            await conn.fetch(
                "SELECT pid, client_port, state, wait_event_type, backend_start "
                "FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = 'database-agent' "
                "ORDER BY backend_start",
                database,
            )
        )
    finally:
        await conn.close()


async def _ingested(database_url: str, group: str, prefix: str) -> int:
    return sum((await stored_offsets(database_url, group, prefix)).values())


def _log_tail(agent: AgentProcess) -> str:
    assert agent.log_path is not None
    return agent.log_path.read_text()[-3000:]


@contextlib.asynccontextmanager
async def _killed_at_random_moments(
    bootstrap: str,
    database_url: str,
    prefix: str,
    tmp_path: Path,
    seed: int,
    *,
    command: list[str] | None = None,
) -> AsyncIterator[tuple[AgentProcess, list[Sent]]]:
    """test_agent's SIGKILL scenario with a given seed: 60k records (one poison) paced over
    12 s, the agent SIGKILLed and restarted 4 times at random moments while they arrive.
    Yields the running agent and what was sent; the agent is killed on exit."""
    await create_topics(bootstrap, prefix, partitions=3)
    rng = random.Random(seed)
    traffic = fleet_traffic(60_000, seed=seed)
    poison = Outgoing(STREAM_BY_NAME["metrics"], b"p", b"{broken", "DecodeError")
    traffic[rng.randrange(len(traffic))] = poison
    env = agent_env(
        bootstrap, database_url, prefix, prefix, batch_max_records=500, session_timeout_ms=6000
    )
    agent = AgentProcess(env, tmp_path / "agent.log")
    if command is not None:
        agent.command = command
    agent.start()
    try:
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=12.0))
        for _ in range(4):
            await asyncio.sleep(rng.uniform(1.0, 2.5))  # the random moment IS the fault
            assert agent.alive(), _log_tail(agent)
            agent.kill()
            agent.start()
        assert not sending.done(), "the kills must land while records are still arriving"
        yield agent, await sending
    finally:
        agent.kill()


# -- 5. randomized SIGKILLs, seeds from CHAOS_SEEDS ---------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_sigkill_at_random_moments_with_seed_loses_and_duplicates_nothing(
    servers: Servers, database_url: str, unique: str, tmp_path: Path, seed: int
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    async with _killed_at_random_moments(bootstrap, database_url, prefix, tmp_path, seed) as (
        agent,
        sent,
    ):
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=240)
        assert agent.stop() == 0


# -- 1. a stalled instance -------------------------------------------------------------------


async def test_a_stalled_instance_is_evicted_and_its_late_write_duplicates_nothing(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    """One of three agents is SIGSTOPped INSIDE its ingest transaction, holding its
    partitions' offset rows, for longer than the session timeout, then SIGCONTed.

    The stop lands there deterministically: the test locks system_events (a staged stream)
    until the victim's backend waits on that lock, its fence already taken; it stops the
    victim and releases the lock, and the victim's backend finishes the statement and sits
    idle in the open transaction. PostgreSQL ends that session after the agents'
    idle-in-transaction timeout, rolling it back and freeing the rows; the group evicts the
    victim after the session timeout; the other two take its partitions and ingest them while
    it is still stopped (they are never blocked by its locks). When it wakes, its late write
    fails (the transaction and the connection are gone) and is retried on a new connection:
    dropped unwritten when the rebalance has revoked its partitions first (as it usually has:
    its first heartbeat learns of the eviction), fenced by the compare-and-set otherwise. The
    oracle: every record exactly once."""
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=6)
    traffic = fleet_traffic(45_000, seed=31)
    addresses = [_metrics_address() for _ in range(3)]
    idle_timeout_s = 4.0  # above the command timeout (the config insists), below the session's
    agents = [
        AgentProcess(
            agent_env(
                bootstrap,
                database_url,
                prefix,
                prefix,
                batch_max_records=500,
                session_timeout_ms=6000,
                db_command_timeout_s=3,
                db_idle_in_transaction_timeout_s=idle_timeout_s,
                metrics_address=address,
                instance_id=f"agent-{i}",
            ),
            tmp_path / f"agent-{i}.log",
        ).start()
        for i, address in enumerate(addresses)
    ]
    victim, victim_address = agents[0], addresses[0]
    started = time.monotonic()

    async def victims_backends() -> list[asyncpg.Record]:
        ports = _local_tcp_ports(victim.pid)  # readable while it is stopped, too
        return [b for b in await _agent_backends(database_url, unique) if b["client_port"] in ports]

    try:

        async def three_members() -> bool:
            state, members = await consumer_group(bootstrap, prefix)
            return state == "Stable" and len(members) == 3

        await until(three_members, within=60, what="three members in a stable group")
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=40.0))

        async def ingesting() -> bool:
            return await _ingested(database_url, prefix, prefix) > 2_000

        await until(ingesting, within=30, what="ingestion under way")
        retries = 0.0
        lock = await asyncpg.connect(database_url, timeout=10)
        held: asyncpg.Record | None = None
        try:
            async with lock.transaction():
                await lock.execute("LOCK TABLE system_events IN SHARE MODE")

                async def victim_waits_on_the_lock() -> bool:
                    nonlocal held
                    for b in await victims_backends():
                        if b["state"] == "active" and b["wait_event_type"] == "Lock":
                            nonlocal retries  # it cannot retry while the lock is held
                            retries = scrape(victim_address, "pipeline_retries_total")
                            victim.signal(signal.SIGSTOP)
                            held = b
                            return True
                    return False

                await until(
                    victim_waits_on_the_lock,
                    within=30,
                    what="the victim's ingest transaction waiting on system_events",
                    every=0.05,
                )
            stopped_at = time.monotonic()  # the lock is released: the statement goes on
        finally:
            await lock.close()
        assert held is not None
        try:

            async def idle_in_its_transaction() -> bool:
                return any(
                    b["pid"] == held["pid"] and b["state"] == "idle in transaction"
                    for b in await _agent_backends(database_url, unique)
                )

            await until(
                idle_in_its_transaction,
                within=10,
                what="the stopped victim's backend idle in its open transaction",
                every=0.05,
            )
            before = await stored_offsets(database_url, prefix, prefix)

            async def session_ended() -> bool:
                return all(
                    b["pid"] != held["pid"] for b in await _agent_backends(database_url, unique)
                )

            await until(
                session_ended,
                within=idle_timeout_s + 20,
                what="PostgreSQL ending the stopped victim's idle transaction",
            )
            ended_after = time.monotonic() - stopped_at
            assert ended_after > idle_timeout_s * 0.8, "ended before its idle timeout?"

            async def evicted() -> bool:
                state, members = await consumer_group(bootstrap, prefix)
                return state == "Stable" and len(members) == 2

            await until(evicted, within=40, what="the stalled member evicted")
            evicted_after = time.monotonic() - stopped_at
            assert evicted_after > 6.0 * 0.8, "evicted before its session timed out?"
            ends = await end_offsets(bootstrap, prefix)
            grew = sum(ends.values()) - sum(before.values())

            # The two others own every partition now, the victim's too, and ingest all that
            # was sent up to the eviction, while the victim is still stopped: its locks are
            # gone with its session.
            async def all_partitions_advanced() -> bool:
                now = await stored_offsets(database_url, prefix, prefix)
                return all(now.get(tp, 0) >= o for tp, o in ends.items())

            try:
                await until(
                    all_partitions_advanced,
                    within=30,
                    what="every partition, the stalled member's too, ingested by the others",
                )
            except AssertionError as exc:
                now = await stored_offsets(database_url, prefix, prefix)
                stuck = sorted(tp for tp, o in ends.items() if now.get(tp, 0) < o)
                backends = [
                    (b["pid"], b["state"], b["wait_event_type"])
                    for b in await _agent_backends(database_url, unique)
                ]
                raise AssertionError(
                    f"{exc}; stuck {stuck}; backends now (pid, state, waiting on) {backends}"
                ) from None
            assert not sending.done(), "records must still arrive when the victim wakes"
            stalled_for = time.monotonic() - stopped_at
        finally:
            victim.signal(signal.SIGCONT)

        # It wakes to a connection the server has closed: its write fails as transient, and
        # the batch is retried on a new connection: fenced by the compare-and-set if the
        # retry runs first, or dropped unwritten when the rebalance revoking its partitions
        # (its first heartbeat learns of the eviction) runs first, as it usually does.
        async def late_write_failed() -> bool:
            return scrape(victim_address, "pipeline_retries_total") > retries

        await until(late_write_failed, within=30, what="the woken victim's write failing")
        sent = await sending
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)

        async def rejoined() -> bool:
            state, members = await consumer_group(bootstrap, prefix)
            return state == "Stable" and len(members) == 3

        await until(rejoined, within=60, what="the stalled member back in the group")
        fenced = [scrape(a, "pipeline_fenced_batches_total") for a in addresses]
        print(
            f"records {len(sent)}, stalled {stalled_for:.1f}s, its session ended after "
            f"{ended_after:.1f}s, evicted after {evicted_after:.1f}s, {grew} records past the "
            f"stored offsets ingested by the others meanwhile, fenced batches per agent "
            f"{fenced}, {time.monotonic() - started:.0f}s in all"
        )
        for agent in agents:
            assert agent.stop() == 0, _log_tail(agent)
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                if agent.alive():
                    agent.signal(signal.SIGCONT)
            agent.kill()


# -- 2. a frozen database backend ------------------------------------------------------------


async def test_a_frozen_database_backend_times_out_and_the_batch_is_retried_on_a_new_connection(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    if servers.stack is None:
        pytest.fail("stopping a PostgreSQL backend needs the local stack; unset the endpoints")
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    traffic = fleet_traffic(40_000, seed=41)
    address = _metrics_address()
    env = agent_env(
        bootstrap,
        database_url,
        prefix,
        prefix,
        batch_max_records=500,
        session_timeout_ms=6000,
        db_command_timeout_s=3,
        metrics_address=address,
    )
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    frozen: int | None = None
    try:
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=20.0))

        async def ingesting() -> bool:
            return await _ingested(database_url, prefix, prefix) > 2_000

        await until(ingesting, within=60, what="ingestion under way")
        ports = _local_tcp_ports(agent.pid)
        backends = [
            b for b in await _agent_backends(database_url, unique) if b["client_port"] in ports
        ]
        assert backends, "the agent's ingest connection"
        frozen = backends[0]["pid"]  # the oldest: the ingest connection, not a short one
        retries = scrape(address, "pipeline_retries_total")
        os.kill(frozen, signal.SIGSTOP)
        try:

            async def retried_on_a_new_connection() -> bool:
                others = [
                    b["pid"]
                    for b in await _agent_backends(database_url, unique)
                    if b["pid"] != frozen
                ]
                return scrape(address, "pipeline_retries_total") > retries and bool(others)

            await until(
                retried_on_a_new_connection,
                within=20,
                what="a command timeout, and the batch retried on a new connection",
            )
            assert agent.alive(), _log_tail(agent)
            retries_frozen = scrape(address, "pipeline_retries_total") - retries
        finally:
            os.kill(frozen, signal.SIGCONT)

        async def frozen_backend_gone() -> bool:
            return all(b["pid"] != frozen for b in await _agent_backends(database_url, unique))

        await until(frozen_backend_gone, within=30, what="the thawed backend ended")
        assert not sending.done(), "the traffic must still flow when the backend thaws"
        sent = await sending
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        assert agent.alive(), "no restart: the agent rode it out on its own"
        fenced = scrape(address, "pipeline_fenced_batches_total")
        print(f"retries while frozen {retries_frozen}, fenced {fenced}, records {len(sent)}")
        assert agent.stop() == 0, _log_tail(agent)
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
        agent.kill()


# -- 3. a slow database ----------------------------------------------------------------------


async def test_a_table_locked_past_the_session_timeout_holds_without_eviction(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    traffic = fleet_traffic(60_000, seed=51)
    address = _metrics_address()
    env = agent_env(
        bootstrap,
        database_url,
        prefix,
        prefix,
        batch_max_records=500,
        session_timeout_ms=6000,
        db_command_timeout_s=3,
        metrics_address=address,
    )
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, traffic, over=25.0))

        async def ingesting() -> bool:
            return await _ingested(database_url, prefix, prefix) > 2_000

        await until(ingesting, within=60, what="ingestion under way")
        state, members = await consumer_group(bootstrap, prefix)
        assert (state, len(members)) == ("Stable", 1)
        rss_before = _rss_kb(agent.pid)
        retries = scrape(address, "pipeline_retries_total")
        rss_during: list[int] = []
        membership: set[tuple[str, tuple[str, ...]]] = set()
        lock = await asyncpg.connect(database_url, timeout=10)
        try:
            async with lock.transaction():
                await lock.execute("LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE")
                locked_at = time.monotonic()
                held_at = await _ingested(database_url, prefix, prefix)
                # Held for twice the session timeout: this wait IS the fault.
                while time.monotonic() - locked_at < 12.0:
                    rss_during.append(_rss_kb(agent.pid))
                    state, members = await consumer_group(bootstrap, prefix)
                    membership.add((state, tuple(members)))
                    await asyncio.sleep(1.0)
                stuck_at = await _ingested(database_url, prefix, prefix)
                retries_locked = scrape(address, "pipeline_retries_total") - retries
        finally:
            await lock.close()
        assert not sending.done(), "records must still arrive after the lock"
        sent = await sending
        await assert_caught_up_exactly_once(database_url, bootstrap, prefix, sent, within=120)
        state, members_after = await consumer_group(bootstrap, prefix)
        membership.add((state, tuple(members_after)))
        fenced = scrape(address, "pipeline_fenced_batches_total")
        print(
            f"records {len(sent)}, retries while locked {retries_locked}, fenced {fenced}, "
            f"stored offsets moved while locked {stuck_at - held_at}, RSS before "
            f"{rss_before // 1024} MB, during max {max(rss_during) // 1024} MB, group {membership}"
        )
        # It held: the batch timed out and was retried with the partitions paused ...
        assert retries_locked >= 1
        # ... and stayed the group's one member all along: no rebalance, nothing fenced.
        assert membership == {("Stable", tuple(members))}
        assert fenced == 0
        assert max(rss_during) < RSS_CAP_KB
        assert agent.alive()
        assert agent.stop() == 0, _log_tail(agent)
    finally:
        agent.kill()
