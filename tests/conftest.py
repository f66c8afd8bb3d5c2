"""Real servers for the tests, found in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` from the environment;
2. a Docker engine, through testcontainers, when one answers;
3. the local stack (``pipeline dev``), started once per test run under a home of its own,
   and stopped and deleted at the end; of the PostgreSQL major ``PIPELINE_DEV_POSTGRES``
   names (docs/compatibility.md), like any stack. Parallel workers (pytest-xdist, as
   ``make test`` runs them) share that one stack: the process that began the run names its
   home, each worker's ``up`` finds it started (or starts it), and the process that named it
   stops it.

The last two run the Kafka release ``PIPELINE_DEV_KAFKA`` names (default 4.3.1), so
``PIPELINE_DEV_KAFKA=3.9.1 pytest`` runs the suite against Kafka 3.9.1.

When none can be had, every test that needs a server fails with the reason: never a skip.
Each test gets its own topics (unique names) and its own PostgreSQL database, so tests run in
parallel; a test that stops or restarts the shared servers is marked ``exclusive`` and runs
while no other test holds them (:func:`_servers_turn`).

PostgreSQL is used as in production (docs/security.md): each test's database is owned and
migrated by the migrator login, and the agents the tests start connect as the agent login,
which has the writer role only (:func:`pipeline.testbed.use_logins`). The tests themselves
connect as the server's administrator (``endpoints.database_url``, a superuser) to look and
to break things. The local stack has the logins; on other servers the session creates them
(their passwords under the session's home), which needs a superuser or CREATEROLE in
``DATABASE_URL``.

With ``PIPELINE_TEST_POOLER=transaction`` (or ``session``), the session starts PgBouncer
(:mod:`pipeline.devstack.pgbouncer`) in that pool mode in front of the PostgreSQL server, and
the agents' and the migrator's URLs go through it (:func:`pipeline.testbed.use_pooler`; behind
a transaction pooler the agents get ``PIPELINE_DB_POOLER=transaction``), as on managed
PostgreSQL's pooled URLs; the tests' own administrator connections stay direct.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import os
import shutil
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import NewTopic

from pipeline import kafka_clients, testbed
from pipeline.devstack import (
    Endpoints,
    Stack,
    endpoints_from_env,
    kafka_versions,
    pgbouncer,
    postgres,
)
from pipeline.devstack.stack import cache_root
from pipeline.errors import ConfigError, DevStackError
from pipeline.records import topic_name
from tests.toxiproxy import Toxiproxy, ToxiproxyError

# One stack per test run: two runs on one machine (a developer's and an editor's, or two
# worktrees) must not stop each other's servers. The process that begins the run names the
# home and passes it on to its workers (and to any pytest a test starts) in STACK_HOME_ENV.
STACK_HOME_ENV = "PIPELINE_TEST_STACK_HOME"
OWNS_STACK_HOME = STACK_HOME_ENV not in os.environ
TEST_STACK_HOME = Path(
    os.environ.get(STACK_HOME_ENV) or cache_root() / "test-stacks" / f"session-{os.getpid()}"
)
# The locks by which tests take turns with the servers (:func:`_servers_turn`).
TURNS = TEST_STACK_HOME.with_name(TEST_STACK_HOME.name + ".turns")
POOLER_ENV = "PIPELINE_TEST_POOLER"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "exclusive: stops or restarts the shared servers, so it runs while no other test "
        "holds them",
    )
    if OWNS_STACK_HOME:
        os.environ[STACK_HOME_ENV] = str(TEST_STACK_HOME)  # before the workers start


def pytest_unconfigure(config: pytest.Config) -> None:
    if not OWNS_STACK_HOME:
        return
    del os.environ[STACK_HOME_ENV]
    if TEST_STACK_HOME.exists():  # a worker started the local stack
        Stack(home=TEST_STACK_HOME).down(purge=True, report=lambda _: None)
    shutil.rmtree(TURNS, ignore_errors=True)


def _docker_engine_answers() -> bool:
    # docker-py leaves its socket to the garbage collector when the engine does not answer;
    # collect it here, where its ResourceWarning is expected, not in some later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # no engine, no socket, no permission: all mean "not this way"
            return False
        finally:
            gc.collect()


@contextlib.contextmanager
def _containers() -> Iterator[Endpoints]:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    with (
        KafkaContainer(f"apache/kafka:{kafka_versions.chosen(os.environ)}").with_kraft() as kafka,
        PostgresContainer("postgres:15", driver=None) as pg,
    ):
        yield Endpoints(kafka.get_bootstrap_server(), pg.get_connection_url())


@dataclass(frozen=True)
class Servers:
    endpoints: Endpoints  # its database_url is the administrator's (a superuser)
    stack: Stack | None  # set when this test session started the local stack itself
    logins: postgres.Logins | None = None  # the migrator, agent and analyst logins
    ca: Path | None = None  # the CA that signed PostgreSQL's certificate, when known


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    mode = os.environ.get(POOLER_ENV) or None
    if mode is not None and mode not in pgbouncer.MODES:
        pytest.fail(f"{POOLER_ENV} must be one of {', '.join(pgbouncer.MODES)}, not {mode!r}")
    with _servers() as found:
        if mode is None:
            yield found
            return
        assert found.logins is not None
        logins = found.logins
        # A PgBouncer per worker: each listens on a port of its own.
        home = TEST_STACK_HOME / f"pgbouncer-{mode}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
        try:
            with pgbouncer.running(
                home,
                mode,
                found.endpoints.database_url,
                [logins.migrator, logins.agent, logins.analyst],
                "postgres",
            ) as bouncer:
                assert bouncer.port is not None
                testbed.use_pooler(bouncer.port, mode)
                try:
                    yield found
                finally:
                    testbed.use_pooler(None)
        except DevStackError as exc:
            pytest.fail(f"{POOLER_ENV}={mode}: {exc}")


@contextlib.contextmanager
def _servers() -> Iterator[Servers]:
    try:
        given = endpoints_from_env()
    except DevStackError as exc:
        pytest.fail(str(exc))
    if given is not None:
        default_stack = Stack()
        if default_stack.serves(given):  # `eval "$(pipeline dev env)"`: the agent's login
            admin = dataclasses.replace(
                given, database_url=default_stack.admin_url(), migrate_database_url=None
            )
            yield _with_logins(admin, None, default_stack.logins(), default_stack.ca().cert)
        else:
            yield _with_logins(given, None, _created_logins(given.database_url), None)
        return
    if _docker_engine_answers():
        with _containers() as found:
            yield _with_logins(found, None, _created_logins(found.database_url), None)
        return
    # Every worker of the run asks for the same stack: `up` starts it once (it holds the
    # home's lock) and finds it running after that. pytest_unconfigure stops it.
    stack = Stack(home=TEST_STACK_HOME)
    try:
        started = stack.up(report=lambda _: None)
    except (ConfigError, DevStackError) as exc:  # ConfigError: PIPELINE_DEV_KAFKA
        pytest.fail(f"no Kafka and PostgreSQL for the integration tests: {exc}")
    # The same endpoints (Kafka's listeners, the control keys) with the superuser's URL.
    admin = dataclasses.replace(started, database_url=stack.admin_url(), migrate_database_url=None)
    yield _with_logins(admin, stack, stack.logins(), stack.ca().cert)


def _with_logins(
    endpoints: Endpoints, stack: Stack | None, logins: postgres.Logins, ca: Path | None
) -> Servers:
    testbed.use_logins(logins, endpoints.database_url)
    return Servers(endpoints, stack, logins, ca)


def _created_logins(admin_url: str) -> postgres.Logins:
    """The logins on a server the session did not start, made with ``admin_url``."""

    async def create() -> postgres.Logins:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            return await postgres.ensure_logins(conn, TEST_STACK_HOME / "secrets")
        finally:
            await conn.close()

    try:
        return asyncio.run(create())
    except asyncpg.InsufficientPrivilegeError as exc:
        pytest.fail(
            f"the tests create the pipeline's logins on the server of DATABASE_URL, and its "
            f"user may not: {exc}. Use a superuser, or one with CREATEROLE and CREATEDB."
        )


@pytest.fixture(autouse=True)
def _servers_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that use the servers hold them shared; an ``exclusive`` test holds them alone.
    It first takes the turnstile, which every test passes through before its shared hold, so
    the tests that start meanwhile wait behind it instead of keeping it waiting for ever."""
    if "servers" not in request.fixturenames:
        yield
        return
    exclusive = request.node.get_closest_marker("exclusive") is not None
    TURNS.mkdir(parents=True, exist_ok=True)
    with (TURNS / "turnstile").open("w") as gate, (TURNS / "servers").open("w") as hold:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if exclusive:
            fcntl.flock(hold, fcntl.LOCK_EX)
            fcntl.flock(gate, fcntl.LOCK_UN)
        else:
            fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(hold, fcntl.LOCK_SH)
        yield


@pytest.fixture(scope="session")
def endpoints(servers: Servers) -> Endpoints:
    return servers.endpoints


@pytest.fixture
def unique() -> str:
    """A short name no other test uses: topics, groups and databases hang off it."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def database_url(endpoints: Endpoints, unique: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test; dropped afterwards."""
    async with testbed.scratch_database(endpoints.database_url, unique) as url:
        yield url


CreateTopic = Callable[..., Awaitable[str]]


@pytest.fixture
async def create_topic(endpoints: Endpoints, unique: str) -> AsyncIterator[CreateTopic]:
    """Create uniquely named topics; they are deleted after the test."""
    admin = kafka_clients.admin(endpoints.kafka)
    await admin.start()
    created: list[str] = []

    async def create(suffix: str = "data", partitions: int = 1) -> str:
        name = topic_name(suffix, f"{unique}.")
        await admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
        created.append(name)
        return name

    try:
        yield create
    finally:
        if created:
            await admin.delete_topics(created)
        await admin.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment with no server endpoints, for subprocesses that must find their own."""
    for name in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "DATABASE_URL",
        "PIPELINE_MIGRATE_DATABASE_URL",
        "PIPELINE_DEV_HOME",
    ):
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


@pytest.fixture(scope="session")
def toxiproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Toxiproxy]:
    """A Toxiproxy server for this session (each worker its own), built on first use
    (:func:`tests.toxiproxy.install`); a build or start that fails fails the test. Each test
    makes its own proxies and removes its toxics."""
    server = Toxiproxy(tmp_path_factory.mktemp("toxiproxy"))
    try:
        server.start()
    except ToxiproxyError as exc:
        pytest.fail(f"no Toxiproxy for the network fault tests: {exc}")
    try:
        yield server
    finally:
        server.stop()
