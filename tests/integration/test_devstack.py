"""`pipeline dev` as a user runs it: the real command line, real servers, real pids.

Every stack here lives under its own ``PIPELINE_DEV_HOME`` in a temporary directory and is
purged afterwards. Other stacks (this session's, a developer's) may hold 9092 and 5432, so
these stacks can land on other ports: the tests read the ports from ``env`` and ``status``
instead of assuming them. The broker's jars come from the shared cache (XDG_CACHE_HOME is left
alone), so an `up` costs seconds, not a Maven download.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from pipeline import kafka_clients
from pipeline.config import redact_url
from pipeline.devstack import Endpoints, kafka, kafka_auth, kafka_versions, postgres
from pipeline.devstack.processes import port_is_free
from pipeline.devstack.stack import PROBE_TIMEOUT, Stack

# The console script next to this interpreter: the entry point users run, not just main().
PIPELINE = Path(sys.executable).with_name("pipeline")
SERVER_ENV = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "DATABASE_URL",
    "PIPELINE_MIGRATE_DATABASE_URL",
    "PIPELINE_DEV_HOME",
)
STATUS_LINE = re.compile(
    r"(?P<name>PostgreSQL|Kafka)(?: (?P<version>\d+(?:\.\d+\.\d+)?))?: "
    r"(?P<state>running|stopped|dead)"
    r"(?: \(pid (?P<pid>\d+)\))?(?: on 127\.0\.0\.1:(?P<port>\d+))?(?P<detail>.*)"
)
EXPORT_LINE = re.compile(
    r"export (KAFKA_BOOTSTRAP_SERVERS|DATABASE_URL|PIPELINE_MIGRATE_DATABASE_URL"
    r"|PIPELINE_CONTROL_PRIVATE_KEY_FILE|PIPELINE_CONTROL_PUBLIC_KEYS)=(\S+)"
)
SERVERS = ["KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"]
# The Kafka release the stacks here run: this session's (PIPELINE_DEV_KAFKA), like its own.
KAFKA = kafka_versions.chosen(os.environ)
MIGRATOR = ["PIPELINE_MIGRATE_DATABASE_URL"]
KEYS = ["PIPELINE_CONTROL_PRIVATE_KEY_FILE", "PIPELINE_CONTROL_PUBLIC_KEYS"]


@dataclass(frozen=True)
class Component:
    state: str
    pid: int | None
    port: int | None
    detail: str
    version: str | None  # of its data: PostgreSQL's major, the Kafka release that formatted it


@dataclass(frozen=True)
class Status:
    code: int
    postgres: Component
    kafka: Component


@dataclass(frozen=True)
class Dev:
    """`pipeline dev ...` against one stack home."""

    home: Path
    env: dict[str, str]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.pipeline("dev", *args, **env)

    def pipeline(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Any `pipeline` command, with this stack home."""
        return subprocess.run(
            [str(PIPELINE), *args],
            env={**self.env, "PIPELINE_DEV_HOME": str(self.home), **env},
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    def ok(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, **env)
        assert result.returncode == 0, f"dev {' '.join(args)}: {result.stderr}"
        return result

    def status(self, **env: str) -> Status:
        result = self.run("status", **env)
        lines = result.stdout.splitlines()
        assert [line.split()[0].rstrip(":") for line in lines] == ["PostgreSQL", "Kafka"], (
            result.stdout
        )
        parsed = {}
        for line in lines:
            match = STATUS_LINE.fullmatch(line)
            assert match is not None, line
            parsed[match["name"]] = Component(
                match["state"],
                int(match["pid"]) if match["pid"] else None,
                int(match["port"]) if match["port"] else None,
                match["detail"],
                match["version"],
            )
        return Status(result.returncode, parsed["PostgreSQL"], parsed["Kafka"])

    def endpoints(self) -> tuple[str, str]:
        return exports(self.ok("env").stdout)

    @property
    def broker_pidfile(self) -> Path:
        return kafka.pidfile(self.home / "kafka").path

    @property
    def postgres_pidfile(self) -> Path:
        return postgres.pidfile(self.home / "postgres").path

    @property
    def pg_data(self) -> Path:
        return postgres.data_dir(self.home / "postgres")

    def pids(self) -> tuple[int, int]:
        """(PostgreSQL, Kafka) as their pid files name them."""
        return (
            int(self.postgres_pidfile.read_text()),
            int(self.broker_pidfile.read_text()),
        )


def clean_environ() -> dict[str, str]:
    # As the `clean_env` fixture, but usable from a module-scoped fixture.
    return {k: v for k, v in os.environ.items() if k not in SERVER_ENV}


def exports(stdout: str) -> tuple[str, str]:
    """(bootstrap, database URL) from `export` lines, which must be the whole output: the
    servers, then for the local stack its control key pair."""
    found = exported(stdout)
    assert list(found) in (SERVERS, SERVERS + MIGRATOR + KEYS), stdout
    return found["KAFKA_BOOTSTRAP_SERVERS"], found["DATABASE_URL"]


def exported(stdout: str) -> dict[str, str]:
    # A value may be quoted for the shell (a URL's "?" and "&"): what the shell would export.
    lines = [" ".join(shlex.split(line)) for line in stdout.splitlines()]
    matches = [EXPORT_LINE.fullmatch(line) for line in lines]
    assert all(matches), stdout
    return {match[1]: match[2] for match in matches if match}


def is_running(pid: int) -> bool:
    # The servers outlive the `pipeline` process that started them, so once they exit only
    # PID 1 can reap them, late or (in a container without an init) never. Until then they
    # are zombies: a /proc entry, but nothing running and no port or file held.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_running(pid):
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.02)


async def _query_and_metadata(bootstrap: str, database_url: str) -> tuple[bool, int]:
    seen = await kafka.broker_in_metadata(bootstrap)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        one = await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    return seen, one


def assert_serving(dev: Dev) -> Status:
    """Both running, `env` agrees with `status` on the ports, and both servers answer."""
    status = dev.status()
    assert status.code == 0, status
    assert (status.postgres.state, status.kafka.state) == ("running", "running")
    assert (status.postgres.pid, status.kafka.pid) == dev.pids()
    assert status.kafka.version == KAFKA
    assert status.postgres.version is not None and status.postgres.version.isdigit()
    bootstrap, url = dev.endpoints()
    assert bootstrap == f"127.0.0.1:{status.kafka.port}"
    # The agents' login, its password in a file of the stack's, readable by its owner only.
    passfile = dev.home / "secrets" / "pg-pipeline_agent.pgpass"
    assert url == (
        f"postgresql://pipeline_agent@127.0.0.1:{status.postgres.port}/pipeline"
        f"?sslmode=disable&passfile={passfile}"
    )
    assert passfile.stat().st_mode & 0o777 == 0o600
    assert urlsplit(url).port == status.postgres.port
    assert asyncio.run(_query_and_metadata(bootstrap, url)) == (True, 1)
    return status


def purge(dev: Dev) -> None:
    result = dev.run("down", "--purge")
    assert result.returncode == 0, result.stderr
    assert not dev.home.exists()
    assert not dev.pg_data.exists()


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """One stack shared by the lifecycle tests; each leaves it running for the next."""
    dev = Dev(tmp_path_factory.mktemp("devstack") / "stack", clean_environ())
    try:
        dev.ok("up")
        yield dev
    finally:
        purge(dev)


@pytest.fixture
def dev(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Dev]:
    """A stack home of this test's own, purged (servers stopped) afterwards."""
    stack = Dev(tmp_path / "stack", clean_env)
    try:
        yield stack
    finally:
        purge(stack)


def test_up_again_restarts_nothing_and_both_endpoints_answer(started: Dev) -> None:
    before = started.pids()
    again = started.ok("up")
    assert "starting" not in again.stderr
    assert started.pids() == before
    assert all(is_running(pid) for pid in before)
    status = assert_serving(started)
    # `up` prints the same exports as `env`, so `eval "$(pipeline dev up)"` works too.
    assert exports(again.stdout) == started.endpoints()
    assert status.kafka.port != status.postgres.port


def test_the_stack_has_a_control_key_pair_that_env_exports(started: Dev) -> None:
    found = exported(started.ok("env").stdout)
    assert list(found) == SERVERS + MIGRATOR + KEYS
    private, public = Path(found[KEYS[0]]), Path(found[KEYS[1]])
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    started.ok("up")
    assert private.read_bytes() == before  # made once, on the first `up`


async def _stored_verifier(admin_url: str, password: str) -> str:
    """What the server itself stores for ``password`` (password_encryption=scram-sha-256)."""
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f"CREATE ROLE scram_probe LOGIN PASSWORD '{password}'")
        try:
            stored: str = await conn.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_probe'"
            )
        finally:
            await conn.execute("DROP ROLE scram_probe")
    finally:
        await conn.close()
    return stored


def test_the_logins_verifier_is_the_one_postgresql_makes(started: Dev) -> None:
    """The verifier `up` sends instead of the password is PostgreSQL's own for it (the same
    salt and iterations give the same keys), and the logins log in with their passwords."""
    port = started.status().postgres.port
    assert port is not None
    password = "probe-" + "x" * 32
    stored = asyncio.run(_stored_verifier(postgres.dsn(port), password))
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$.*", stored)
    assert match is not None, stored
    iterations, salt = match.groups()
    assert postgres.scram_verifier(password, base64.b64decode(salt), int(iterations)) == stored
    assert_serving(started)  # the agent's login, with the password of its file


def test_a_failed_role_statement_leaves_no_password_in_the_servers_log(started: Dev) -> None:
    """A statement that fails is logged whole: the logins' statements carry verifiers, never
    the passwords, and the log is not for other users to read."""
    started.ok("up")
    port = started.status().postgres.port
    assert port is not None
    secrets_dir = started.home / "secrets"
    logins = postgres.logins(secrets_dir)
    passwords = [login.password() for login in (logins.migrator, logins.agent, logins.analyst)]
    log = started.home / "postgres" / "postgres.log"
    logged_before = log.read_text()

    async def as_the_analyst() -> None:  # who may not alter roles: the statement fails
        conn = await asyncpg.connect(logins.analyst.url(postgres.dsn(port)), timeout=10)
        try:
            await postgres.ensure_logins(conn, secrets_dir)
        finally:
            await conn.close()

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        asyncio.run(as_the_analyst())
    deadline = time.monotonic() + 10
    while "ALTER ROLE pipeline_migrator" not in log.read_text()[len(logged_before) :]:
        assert time.monotonic() < deadline, log.read_text()[len(logged_before) :]
        time.sleep(0.05)
    logged = log.read_text()[len(logged_before) :]
    (statement,) = [line for line in logged.splitlines() if "ALTER ROLE" in line]
    assert "PASSWORD 'SCRAM-SHA-256$4096:" in statement
    assert [p for p in passwords if p in log.read_text()] == []
    assert log.stat().st_mode & 0o777 == 0o600


def test_composes_provisioning_jobs_give_the_stacks_logins_and_users(started: Dev) -> None:
    """What compose.yaml's logins and kafka-users jobs run, on this stack's servers (with
    its secrets): idempotent, and the logins and users still log in afterwards."""
    started.ok("up")
    status = started.status()
    secrets_dir = str(started.home / "secrets")
    for args in (
        ["postgres", "--admin-url", postgres.dsn(status.postgres.port or 0, "postgres")],
        ["kafka", "--bootstrap", f"127.0.0.1:{status.kafka.port}"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.devstack.provision", *args, "--secrets", secrets_dir],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, f"provision {args[0]}: done\n"), done.stderr
    assert_serving(started)
    secure = Stack(started.home).endpoints().kafka_secure
    assert secure is not None
    for user in kafka_auth.USERS:  # each logs in on the SASL_SSL listener, with its file's
        asyncio.run(kafka_clients.check_connection(secure.settings(user), PROBE_TIMEOUT))


def test_killed_broker_is_reported_dead_and_up_restarts_only_it(started: Dev) -> None:
    started.ok("up")
    pg_pid, broker_pid = started.pids()
    kill_and_wait(broker_pid)

    status = started.status()
    assert status.code == 3
    assert status.kafka.state == "dead"
    assert status.kafka.pid is None
    assert f"pid file names {broker_pid}, which is not running" in status.kafka.detail
    assert (status.postgres.state, status.postgres.pid) == ("running", pg_pid)
    # `env` refuses to hand out the endpoints of a half-dead stack.
    refused = started.run("env")
    assert refused.returncode == 2
    assert "pipeline dev up" in refused.stderr
    assert refused.stdout == ""

    restarted = started.ok("up")
    new_pg_pid, new_broker_pid = started.pids()
    assert new_pg_pid == pg_pid
    assert new_broker_pid != broker_pid
    assert f"Kafka {KAFKA} starting (pid {new_broker_pid})" in restarted.stderr
    assert "PostgreSQL" not in restarted.stderr
    assert_serving(started)


def test_killed_postgres_is_reported_dead_and_up_restarts_only_it(started: Dev) -> None:
    started.ok("up")
    pg_pid, broker_pid = started.pids()
    kill_and_wait(pg_pid)

    status = started.status()
    assert status.code == 3
    assert status.postgres.state == "dead"
    assert f"pid file names {pg_pid}, which is not running" in status.postgres.detail
    assert (status.kafka.state, status.kafka.pid) == ("running", broker_pid)

    restarted = started.ok("up")
    new_pg_pid, new_broker_pid = started.pids()
    assert new_broker_pid == broker_pid
    assert new_pg_pid != pg_pid
    assert f"starting (pid {new_pg_pid})" in restarted.stderr
    assert "Kafka" not in restarted.stderr
    assert_serving(started)


def test_down_stops_both_by_pid_and_up_starts_new_servers(started: Dev) -> None:
    started.ok("up")
    before = assert_serving(started)
    pg_pid, broker_pid = started.pids()

    down = started.ok("down")
    assert f"Kafka stopped (pid {broker_pid})" in down.stderr
    assert f"PostgreSQL stopped (pid {pg_pid})" in down.stderr
    assert "killed" not in down.stderr  # both shut down cleanly on the first signal
    assert not is_running(pg_pid)
    assert not is_running(broker_pid)
    assert not started.broker_pidfile.exists()
    assert not started.postgres_pidfile.exists()
    assert before.kafka.port and port_is_free(before.kafka.port)
    assert before.postgres.port and port_is_free(before.postgres.port)
    assert started.pg_data.is_dir()  # a plain `down` keeps the data

    status = started.status()
    assert status.code == 3
    # Stopped, each still shows the version of the data it kept.
    assert status.postgres == Component("stopped", None, None, "", before.postgres.version)
    assert status.kafka == Component("stopped", None, None, "", KAFKA)
    again_down = started.ok("down")
    assert again_down.stderr == ""

    up = started.ok("up")
    new_pg_pid, new_broker_pid = started.pids()
    assert new_pg_pid not in (pg_pid, broker_pid)
    assert new_broker_pid not in (pg_pid, broker_pid)
    assert f"starting (pid {new_pg_pid})" in up.stderr
    assert f"starting (pid {new_broker_pid})" in up.stderr
    after = assert_serving(started)
    # The ports are remembered in the stack home, unless someone took them meanwhile.
    for name, old, new in (
        ("Kafka", before.kafka.port, after.kafka.port),
        ("PostgreSQL", before.postgres.port, after.postgres.port),
    ):
        assert new == old or f"port {old} is taken; {name} uses port {new}" in up.stderr


def test_exported_endpoints_of_a_stopped_stack_are_down_and_up_starts_it(started: Dev) -> None:
    """What a newcomer does: eval "$(pipeline dev env)", later `down`, then `status` and `up`
    in the same shell. The environment names the stack's own servers: they are the stack."""
    started.ok("up")
    bootstrap, url = started.endpoints()
    exported = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": url}
    before = started.status(**exported)
    assert before.code == 0
    started.ok("down", **exported)

    stopped = started.status(**exported)
    assert stopped.code == 3
    assert stopped.postgres == Component("stopped", None, None, "", before.postgres.version)
    assert stopped.kafka == Component("stopped", None, None, "", KAFKA)

    up = started.ok("up", **exported)
    pg_pid, broker_pid = started.pids()
    assert f"starting (pid {pg_pid})" in up.stderr
    assert f"starting (pid {broker_pid})" in up.stderr
    after = assert_serving(started)
    assert started.status(**exported) == after
    if exports(up.stdout) != (bootstrap, url):  # someone took a port meanwhile: it says so
        assert "the local stack listens on other ports than KAFKA_BOOTSTRAP_SERVERS" in up.stderr
    else:
        assert "other ports" not in up.stderr


@pytest.mark.parametrize("frozen", ["PostgreSQL", "Kafka"])
def test_a_frozen_server_runs_but_does_not_answer(started: Dev, frozen: str) -> None:
    started.ok("up")
    pg_pid, broker_pid = started.pids()
    pid = pg_pid if frozen == "PostgreSQL" else broker_pid
    os.kill(pid, signal.SIGSTOP)  # its process lives, its port accepts, nothing answers
    try:
        status = started.status()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status.code == 3
    stuck, fine = (
        (status.postgres, status.kafka)
        if frozen == "PostgreSQL"
        else (status.kafka, status.postgres)
    )
    assert (stuck.state, stuck.pid) == ("running", pid)
    assert stuck.detail == f", but does not answer: no answer within {PROBE_TIMEOUT:g}s"
    assert (fine.state, fine.detail) == ("running", "")
    # Thawed, it answers again: within seconds, not at once (a broker rejoins its controller).
    deadline = time.monotonic() + 60
    while (status := started.status()).code != 0:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert_serving(started)


def test_endpoints_elsewhere_that_do_not_answer_start_nothing_and_fail(dev: Dev) -> None:
    given = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka.example.invalid:9092",
        "DATABASE_URL": "postgresql://someone:s3cret@db.example.invalid:5432/elsewhere",
    }
    shown = "postgresql://someone:***@db.example.invalid:5432/elsewhere"
    up = dev.run("up", **given)
    assert (up.returncode, up.stdout) == (2, "")
    lines = up.stderr.splitlines()
    assert lines[0] == (
        "pipeline: error: KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL are set to servers other "
        "than the local stack, so nothing was started, and not all of them answer:"
    )
    assert lines[1].startswith(f"  PostgreSQL: does not answer at {shown} (DATABASE_URL): ")
    assert lines[2].startswith(
        "  Kafka: does not answer at kafka.example.invalid:9092 (KAFKA_BOOTSTRAP_SERVERS): "
    )
    assert lines[3:] == ["To use the local stack instead, unset both and run `pipeline dev up`."]
    assert "s3cret" not in up.stderr
    # `env` only repeats the variables; `status` asks the servers.
    assert exports(dev.ok("env", **given).stdout) == tuple(given.values())
    status = dev.run("status", **given)
    assert status.returncode == 3
    pg_line, kafka_line = status.stdout.splitlines()
    assert pg_line.startswith(f"PostgreSQL: does not answer at {shown} (DATABASE_URL): ")
    assert kafka_line.startswith(
        "Kafka: does not answer at kafka.example.invalid:9092 (KAFKA_BOOTSTRAP_SERVERS): "
    )
    assert sorted(dev.home.rglob("*.pid")) == []
    assert not dev.home.exists()


def test_exported_endpoints_of_a_stopped_stack_held_by_others_are_not_the_stack(dev: Dev) -> None:
    """The stack stopped and other servers took both its ports (Docker's, on the defaults):
    the exported endpoints reach those, so nothing starts and they are asked instead."""
    dev.ok("up")
    bootstrap, url = dev.endpoints()
    exported = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": url}
    dev.ok("down")
    with contextlib.ExitStack() as listeners:
        for address in (bootstrap, f"127.0.0.1:{urlsplit(url).port}"):
            sock = listeners.enter_context(socket.socket())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            host, port = address.rsplit(":", 1)
            sock.bind((host, int(port)))
            sock.listen()  # connections are made, nothing ever answers
        up = dev.run("up", **exported)
        status = dev.run("status", **exported)
    assert (up.returncode, up.stdout) == (2, "")
    assert "set to servers other than the local stack, so nothing was started" in up.stderr
    assert not dev.postgres_pidfile.exists()
    assert not dev.broker_pidfile.exists()
    assert status.returncode == 3
    assert status.stdout.splitlines() == [
        f"PostgreSQL: does not answer at {url} (DATABASE_URL): no answer within {PROBE_TIMEOUT:g}s",
        f"Kafka: does not answer at {bootstrap} (KAFKA_BOOTSTRAP_SERVERS): "
        f"no answer within {PROBE_TIMEOUT:g}s",
    ]


def test_endpoints_elsewhere_that_answer_start_nothing(dev: Dev, endpoints: Endpoints) -> None:
    # This session's servers: up, but not the stack of this test's home.
    given = {
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
        "DATABASE_URL": endpoints.database_url,
    }
    up = dev.ok("up", **given)
    assert exports(up.stdout) == (endpoints.kafka_bootstrap, endpoints.database_url)
    assert up.stderr == (
        "KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL are set to servers other than the local "
        "stack: using those (both answer), nothing started\n"
    )
    status = dev.run("status", **given)
    assert (status.returncode, status.stdout) == (
        0,
        f"PostgreSQL: answers at {redact_url(endpoints.database_url)} (DATABASE_URL)\n"
        f"Kafka: answers at {endpoints.kafka_bootstrap} (KAFKA_BOOTSTRAP_SERVERS)\n",
    )
    assert not dev.home.exists()


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}, "DATABASE_URL"),
        (
            {"DATABASE_URL": "postgresql://pipeline@127.0.0.1:5432/pipeline"},
            "KAFKA_BOOTSTRAP_SERVERS",
        ),
    ],
)
@pytest.mark.parametrize("action", ["up", "env", "status"])
def test_only_one_endpoint_in_the_environment_is_an_error(
    dev: Dev, action: str, given: dict[str, str], missing: str
) -> None:
    result = dev.run(action, **given)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"but {missing} is not: set both" in result.stderr
    assert result.stderr.startswith("pipeline: error: ")
    assert not dev.home.exists()


def test_a_stack_keeps_its_postgres_major_until_purged(dev: Dev) -> None:
    """A stack's data directory is of one major: asking for another is refused before
    anything starts, whether the stack runs or not. Purged, the next `up` runs the major asked
    for (from Maven Central: the machine has no server of it), and an `up` without the setting
    keeps it."""
    major = postgres.find_binaries().major
    other = 13 if major != 13 else 14
    dev.ok("up")
    running = assert_serving(dev)
    assert running.postgres.version == str(major)

    refused = dev.run("up", "--postgres", str(other))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert (
        f"created by PostgreSQL {major}, which PostgreSQL {other} "
        f"(PIPELINE_DEV_POSTGRES={other}) cannot use" in refused.stderr
    )
    assert "`pipeline dev down --purge`" in refused.stderr
    assert "PIPELINE_DEV_HOME" in refused.stderr
    assert assert_serving(dev) == running  # the same servers, untouched

    dev.ok("down")
    refused = dev.run("up", PIPELINE_DEV_POSTGRES=str(other))
    assert refused.returncode == 2
    assert f"(PIPELINE_DEV_POSTGRES={other}) cannot use" in refused.stderr
    # It fails before starting anything, so nothing is left half up.
    assert not dev.postgres_pidfile.exists()
    assert not dev.broker_pidfile.exists()

    # Following the advice works: purge removes the home and the data directory...
    purged = dev.ok("down", "--purge")
    assert f"removed {dev.home}" in purged.stderr
    assert not dev.home.exists()
    assert not dev.pg_data.exists()
    # ...and the next `up` creates a cluster of the major asked for.
    started = dev.ok("up", "--postgres", str(other))
    assert f"PostgreSQL {other} starting" in started.stderr
    assert (dev.pg_data / "PG_VERSION").read_text().strip() == str(other)
    status = assert_serving(dev)
    assert status.postgres.version == str(other)
    # Unset, the stack keeps its major; the machine's own server is refused.
    dev.ok("up")
    assert assert_serving(dev) == status
    refused = dev.run("up", PIPELINE_DEV_POSTGRES="system")
    assert refused.returncode == 2
    assert (
        f"created by PostgreSQL {other}, which PostgreSQL {major} "
        "(PIPELINE_DEV_POSTGRES=system, " in refused.stderr
    )


def test_data_of_another_kafka_release_is_refused_until_purged(dev: Dev) -> None:
    other = "4.3.1" if KAFKA.startswith("3.") else "3.9.1"
    dev.ok("up")
    dev.ok("down")
    assert dev.status().kafka == Component("stopped", None, None, "", KAFKA)

    # Asked for another release, by the flag or the variable: it starts nothing, not even
    # PostgreSQL, and says what to do.
    for refused in (dev.run("up", "--kafka", other), dev.run("up", PIPELINE_DEV_KAFKA=other)):
        assert refused.returncode == 2
        assert refused.stdout == ""
        assert refused.stderr == (
            f"pipeline: error: the Kafka data in {dev.home / 'kafka' / 'data'} was formatted "
            f"by Kafka {KAFKA}, but this `up` would run Kafka {other}. Run Kafka {KAFKA} "
            f"(PIPELINE_DEV_KAFKA={KAFKA}, or `pipeline dev up --kafka {KAFKA}`), or remove "
            "the data with `pipeline dev down --purge` (it is lost), or use another "
            f"PIPELINE_DEV_HOME for Kafka {other}.\n"
        )
        assert not dev.postgres_pidfile.exists()
        assert not dev.broker_pidfile.exists()
    # Its own release starts it again, data kept.
    dev.ok("up", "--kafka", KAFKA)
    assert assert_serving(dev).kafka.version == KAFKA


def test_no_postgres_binaries_says_what_to_install(dev: Dev, tmp_path: Path) -> None:
    empty = tmp_path / "no-postgres-here"
    empty.mkdir()
    result = dev.run("up", PIPELINE_PG_BINDIR=str(empty))
    assert result.returncode == 2
    assert f"PostgreSQL server binaries (postgres, initdb) not found in {empty}" in result.stderr
    assert "apt-get install postgresql" in result.stderr
    assert "PIPELINE_PG_BINDIR" in result.stderr
    assert sorted(dev.home.rglob("*.pid")) == []


@pytest.mark.parametrize(
    ("on_path", "message", "install"),
    [
        ((), "Java is not on PATH", "apt-get install openjdk-17-jre-headless"),
        (("java",), "Maven (mvn) is not on PATH", "apt-get install maven"),
    ],
)
def test_missing_java_or_maven_says_what_to_install(
    dev: Dev, tmp_path: Path, on_path: tuple[str, ...], message: str, install: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in on_path:
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to run this test"
        (bin_dir / tool).symlink_to(found)
    # An empty jar cache, so the jars must be resolved and Java and Maven are needed.
    cache = tmp_path / "cache"
    result = dev.run("up", PATH=str(bin_dir), XDG_CACHE_HOME=str(cache))
    assert result.returncode == 2
    assert message in result.stderr
    assert install in result.stderr
    assert not (cache / "agent-pipeline" / f"kafka-{KAFKA}" / ".complete").exists()
    assert sorted(dev.home.rglob("*.pid")) == []


def test_the_demo_says_that_the_stack_it_started_still_runs(dev: Dev) -> None:
    demo = dev.pipeline("demo", "--duration", "1", "--rate", "500", "--seed", "1")
    assert demo.returncode == 0, demo.stderr
    status = assert_serving(dev)  # it left the stack running...
    assert demo.stdout.splitlines()[-1] == (  # ...and its last words say so, and what to do
        f"The local stack is still running (PostgreSQL on 127.0.0.1:{status.postgres.port}, "
        f"Kafka on 127.0.0.1:{status.kafka.port}; the demo started it). Stop it with "
        "`pipeline dev down` (add --purge to delete its data)."
    )
