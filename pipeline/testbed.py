"""What the integration tests and `pipeline bench` both need to drive the pipeline from the
outside: prefixed topics, a backlog produced to them, end and stored offsets, scratch
databases, and ``pipeline run`` processes.

tests/integration/harness.py and consumers/bench.py build on these; neither keeps a copy.
Like the rest of ``pipeline``, this module imports neither ``producers`` nor ``consumers``: an
agent here is a ``pipeline run`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import asyncpg
from aiokafka.structs import RecordMetadata

from pipeline import db, kafka_clients
from pipeline import kafka as kafka_io
from pipeline.catalog import Catalog, load
from pipeline.devstack import pgbouncer, postgres
from pipeline.devstack.postgres import Login, Logins
from pipeline.kafka_clients import KafkaSettings
from pipeline.records import DLQ_TOPIC, topic_name

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> offset

#: ``pipeline run`` with this interpreter, as the tests and the benchmark start agents.
AGENT_COMMAND = (sys.executable, "-m", "pipeline.cli", "run")
REPLAY_COMMAND = (sys.executable, "-m", "pipeline.cli", "replay")


def data_topics(prefix: str, catalog: Catalog | None = None) -> list[str]:
    """The data topics' names of ``catalog`` (default: the built-in streams) under
    ``prefix``."""
    return list((catalog or load()).topics(prefix))


async def create_topics(
    kafka: KafkaSettings, prefix: str, partitions: int, catalog: Catalog | None = None
) -> None:
    """The data topics of ``catalog`` (default: the built-in streams) and the dead-letter
    topic under ``prefix``."""
    await kafka_io.ensure_topics(
        kafka, [*data_topics(prefix, catalog), topic_name(DLQ_TOPIC, prefix)], partitions
    )


class Message(NamedTuple):
    """One record to produce, to its full (prefixed) topic name."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes | None]] = ()


async def produce(
    kafka: KafkaSettings,
    chunks: Iterable[Sequence[Message]],
    *,
    acked: Callable[[list[RecordMetadata]], object] | None = None,
    **producer_settings: Any,
) -> None:
    """Send ``chunks`` one after another with an idempotent, acks=all producer (plus
    ``producer_settings``): a chunk is acknowledged before the next is queued. ``acked``
    gets each chunk's record metadata, in order."""
    producer = kafka_clients.producer(
        kafka, **{"acks": "all", "enable_idempotence": True, **producer_settings}
    )
    await producer.start()
    try:
        for chunk in chunks:
            futures = [
                await producer.send(m.topic, m.value, key=m.key, headers=list(m.headers))
                for m in chunk
            ]
            metadata = await asyncio.gather(*futures)
            if acked is not None:
                acked(list(metadata))
    finally:
        await producer.stop()


async def end_offsets(kafka: KafkaSettings, prefix: str, catalog: Catalog | None = None) -> Offsets:
    """The end offset of every partition of the data topics of ``catalog`` (default: the
    built-in streams) under ``prefix``."""
    return await kafka_io.end_offsets(kafka, data_topics(prefix, catalog))


async def stored_offsets(conn: asyncpg.Connection, group: str) -> Offsets:
    """The database's stored offsets of ``group``; none before the agent has migrated."""
    try:
        return await db.stored_offsets(conn, group)
    except asyncpg.UndefinedTableError:
        return {}


class _InUse:
    logins: Logins | None = None
    admin: str | None = None  # the administrator's user name: its URLs are rewritten
    pooler: tuple[int, str] | None = None  # a PgBouncer's port and pool mode


def use_logins(logins: Logins | None, admin_url: str) -> None:
    """Run as these logins from now on (the test session sets them once): scratch databases
    are owned and migrated by the migrator, and the agents of :func:`agent_env` connect as
    the agent login, with the writer role only. Only URLs of ``admin_url``'s user (the
    administrator, who creates the databases) are rewritten: a URL with a login of its own
    (a test's restricted role, say) is used as it is. Without logins, nothing is rewritten."""
    _InUse.logins = logins
    _InUse.admin = urlsplit(admin_url).username


def use_pooler(port: int | None, mode: str = "transaction") -> None:
    """From now on (the test session sets it once), the agent and migrator URLs made from the
    administrator's go through the PgBouncer on 127.0.0.1:``port``, in pool ``mode``; the
    administrator's own connections stay direct. ``None``: directly again."""
    pgbouncer.check_mode(mode)
    _InUse.pooler = None if port is None else (port, mode)


def pooler_mode() -> str | None:
    """The pool mode of the pooler in use (:func:`use_pooler`), None when direct."""
    return None if _InUse.pooler is None else _InUse.pooler[1]


def pooler_settings() -> dict[str, str]:
    """The agents' settings for the pooler in use: behind a transaction pooler, no prepared
    statement cache (PIPELINE_DB_POOLER)."""
    mode = pooler_mode()
    return {} if mode is None else pgbouncer.agent_settings(mode)


def as_agent(database_url: str) -> str:
    """``database_url`` as the agent login, when it is the administrator's."""
    logins = _InUse.logins
    return _as(logins.agent, database_url) if logins is not None else database_url


def as_migrator(database_url: str) -> str:
    """``database_url`` as the migrator login, when it is the administrator's."""
    logins = _InUse.logins
    return _as(logins.migrator, database_url) if logins is not None else database_url


def _as(login: Login, database_url: str) -> str:
    if urlsplit(database_url).username != _InUse.admin:
        return database_url
    url = login.url(database_url)
    return url if _InUse.pooler is None else pgbouncer.through(url, _InUse.pooler[0])


async def migrate(
    database_url: str,
    migrations: Sequence[db.Migration] | None = None,
    catalog: Catalog | None = None,
) -> None:
    """Apply ``migrations`` (default: all of sql/) and the tables of ``catalog`` (default: the
    built-in streams) as the migrator (through the pooler in use, with no prepared
    statements, which a transaction pooler cannot keep)."""
    conn = await asyncpg.connect(as_migrator(database_url), timeout=10, statement_cache_size=0)
    try:
        await db.migrate(conn, db.read_migrations() if migrations is None else migrations, catalog)
    finally:
        await conn.close()


def database_url_for(server_url: str, database: str) -> str:
    """``server_url`` with ``database`` in place of its database (its query kept)."""
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def scratch_database(
    server_url: str,
    database: str,
    migrations: Sequence[db.Migration] | None = None,
    catalog: Catalog | None = None,
) -> AsyncIterator[str]:
    """A new database on the server of ``server_url``, owned by the migrator and migrated
    by it (``migrations``, default all of sql/, and the tables of ``catalog``, default the
    built-in streams): its URL, with ``server_url``'s login; dropped afterwards, connections
    and all."""
    logins = _InUse.logins
    url = database_url_for(server_url, database)
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        owner = None if logins is None else logins.migrator.user
        await postgres.create_database(conn, url, database, owner)
    finally:
        await conn.close()
    try:
        await migrate(url, migrations, catalog)
        yield url
    finally:
        conn = await asyncpg.connect(server_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()


def agent_env(
    bootstrap: str, database_url: str, prefix: str, group: str, **settings: object
) -> dict[str, str]:
    """This process's environment, set for a ``pipeline run`` on those servers, topics and
    group, with no /metrics, connecting to ``database_url``'s database as the agent login
    (:func:`use_logins`), through the pooler in use (:func:`use_pooler`, with its
    :func:`pooler_settings`); ``settings`` become ``PIPELINE_<NAME>`` variables."""
    env = dict(os.environ)
    env.pop("PIPELINE_MIGRATE_DATABASE_URL", None)  # an agent has no use for the migrator
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        DATABASE_URL=as_agent(database_url),
        PIPELINE_TOPIC_PREFIX=prefix,
        PIPELINE_GROUP_ID=group,
        PIPELINE_METRICS_ADDRESS="",
    )
    settings = {**pooler_settings(), **settings}
    env.update({f"PIPELINE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class AgentProcess:
    """A ``pipeline run`` process; stopped or killed by its pid.

    Its output goes to ``log_path``, or, without one, its stderr is this process's and its
    stdout is discarded. ``args`` are added to the command; ``wrapper`` runs it (a profiler).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path | None = None,
        *,
        args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
    ) -> None:
        self._env = env
        self.log_path = log_path
        self.command = [*wrapper, *AGENT_COMMAND, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        if self.log_path is None:
            self.proc = subprocess.Popen(
                self.command, env=self._env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
            )
            return self
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, within: float) -> int:
        assert self.proc is not None
        return self.proc.wait(within)

    def kill(self) -> None:
        """SIGKILL: no chance to finish the batch, commit or leave the group."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, within: float = 40.0) -> int:
        """SIGTERM and wait for a clean exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(within)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def stop_agents(agents: Sequence[AgentProcess], within: float = 60.0) -> None:
    """SIGTERM every agent still running at once, then wait for each to exit."""
    for agent in agents:
        if agent.alive():
            agent.signal(signal.SIGTERM)
    for agent in agents:
        await asyncio.to_thread(agent.wait, within)
