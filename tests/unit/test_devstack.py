"""The local stack's pure parts and its process bookkeeping: no servers, no network."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.devstack import Endpoints, endpoints_from_env, postgres, tls
from pipeline.devstack.kafka import ProxiedListener, _server_properties
from pipeline.devstack.kafka_versions import DEFAULT_VERSION, release
from pipeline.devstack.processes import PidFile, choose_port, port_is_free, spawn, wait_exit
from pipeline.devstack.stack import ComponentStatus
from pipeline.errors import DevStackError
from tests.unit.test_safe_dirs import NOBODY, SERVER, snapshot, victim

BOOTSTRAP = "127.0.0.1:9092"
URL = "postgresql://pipeline@127.0.0.1:5432/pipeline"
DEFAULT = release(DEFAULT_VERSION)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP, "DATABASE_URL": URL}, Endpoints(BOOTSTRAP, URL)),
        ({}, None),
        # An exported-but-empty variable (`export DATABASE_URL=`) counts as unset.
        ({"KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": ""}, None),
        ({"PATH": "/usr/bin", "PIPELINE_DEV_HOME": "/tmp/x"}, None),
    ],
)
def test_endpoints_from_env(environ: dict[str, str], expected: Endpoints | None) -> None:
    assert endpoints_from_env(environ) == expected


@pytest.mark.parametrize(
    ("environ", "present", "missing"),
    [
        ({"KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP}, "KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"),
        ({"DATABASE_URL": URL}, "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"),
        (
            {"KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP, "DATABASE_URL": ""},
            "KAFKA_BOOTSTRAP_SERVERS",
            "DATABASE_URL",
        ),
    ],
)
def test_endpoints_from_env_with_one_missing_names_it(
    environ: dict[str, str], present: str, missing: str
) -> None:
    with pytest.raises(DevStackError) as raised:
        endpoints_from_env(environ)
    assert str(raised.value).startswith(f"{present} is set but {missing} is not: set both")


def test_exports_are_lines_a_shell_can_eval() -> None:
    assert Endpoints(BOOTSTRAP, URL).exports() == (
        "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092\n"
        "export DATABASE_URL=postgresql://pipeline@127.0.0.1:5432/pipeline\n"
    )


def test_the_stacks_key_pair_is_exported_quoted_for_a_shell() -> None:
    keys = (Path("/home/a b/keys/antigravity.key"), Path("/home/a b/keys/antigravity.pub"))
    assert Endpoints(BOOTSTRAP, URL, keys).exports() == (
        "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092\n"
        "export DATABASE_URL=postgresql://pipeline@127.0.0.1:5432/pipeline\n"
        "export PIPELINE_CONTROL_PRIVATE_KEY_FILE='/home/a b/keys/antigravity.key'\n"
        "export PIPELINE_CONTROL_PUBLIC_KEYS='/home/a b/keys/antigravity.pub'\n"
    )


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (
            ComponentStatus("Kafka", "running", 41, 9092, ""),
            "Kafka: running (pid 41) on 127.0.0.1:9092",
        ),
        (ComponentStatus("PostgreSQL", "stopped", None, 5432, ""), "PostgreSQL: stopped"),
        (
            ComponentStatus("Kafka", "running", 41, 9092, "", version="3.9.1"),
            "Kafka 3.9.1: running (pid 41) on 127.0.0.1:9092",
        ),
        (
            ComponentStatus("Kafka", "stopped", None, 9092, "", version="3.9.1"),
            "Kafka 3.9.1: stopped",
        ),
        (
            ComponentStatus(
                "Kafka", "dead", None, 9092, ": pid file names 41, which is not running"
            ),
            "Kafka: dead: pid file names 41, which is not running",
        ),
    ],
)
def test_status_line(status: ComponentStatus, line: str) -> None:
    assert status.line() == line


# -- ports ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listening() -> Iterator[int]:
    """A port with a listener on it, as a running server would hold it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_choose_port_keeps_a_free_preferred_port() -> None:
    port = free_port()
    assert choose_port(port) == port


def test_choose_port_moves_off_a_port_with_a_listener(listening: int) -> None:
    assert not port_is_free(listening)
    port = choose_port(listening)
    assert port != listening
    assert port_is_free(port)


def test_choose_port_skips_ports_already_given_out() -> None:
    # Kafka's two ports are chosen before either server binds them, so a port handed to
    # PostgreSQL or the client listener must not be handed out again.
    port = free_port()
    chosen = choose_port(port, taken={port})
    assert chosen != port
    assert port_is_free(chosen)


# -- pid files -----------------------------------------------------------------------------


def own_marker() -> str:
    """A piece of this process's command line, as the stack's markers are of theirs."""
    return Path(f"/proc/{os.getpid()}/cmdline").read_bytes().split(b"\0")[0].decode()


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# Stand-ins in the table below, resolved inside the test.
THIS = "<this process's pid>"
EXITED = "<an exited process's pid>"
OURS = "<part of this process's command line>"


@pytest.mark.parametrize(
    ("content", "marker", "expected"),
    [
        # expected: (read(), live_pid())
        (None, "kafka.Kafka", (None, None)),  # no file: never started, or stopped
        ("", "kafka.Kafka", (None, None)),
        ("not a pid", "kafka.Kafka", (None, None)),
        (THIS, OURS, (THIS, THIS)),
        # A live pid that is not what the file says it started: the number was reused.
        (THIS, "kafka.Kafka", (THIS, None)),
        (EXITED, "kafka.Kafka", (EXITED, None)),  # a crash or a kill -9
    ],
)
def test_pid_file(
    tmp_path: Path,
    content: str | None,
    marker: str,
    expected: tuple[str | None, str | None],
) -> None:
    pids = {THIS: os.getpid(), EXITED: exited_pid()}
    pidfile = PidFile(tmp_path / "server.pid", own_marker() if marker == OURS else marker)
    if content is not None:
        pidfile.path.write_text(f"{pids.get(content, content)}\n")
    read, live = expected
    assert pidfile.read() == (pids[read] if read else None)
    assert pidfile.live_pid() == (pids[live] if live else None)


def test_pid_file_treats_a_zombie_as_dead(tmp_path: Path) -> None:
    # A server whose parent has not reaped it yet (the `pipeline` process that started it
    # has exited and PID 1 reaps late or never) still has a pid but runs nothing.
    proc = subprocess.Popen([sys.executable, "-c", ""])
    try:
        stat = Path(f"/proc/{proc.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        pidfile = PidFile(tmp_path / "server.pid", sys.executable)
        pidfile.write(proc.pid)
        assert pidfile.live_pid() is None
        assert pidfile.read() == proc.pid  # the file is there, its process is not
    finally:
        proc.wait()


def test_pid_file_round_trip(tmp_path: Path) -> None:
    pidfile = PidFile(tmp_path / "server.pid", "x")
    pidfile.write(1234)
    assert pidfile.path.read_text() == "1234\n"
    assert pidfile.read() == 1234
    pidfile.remove()
    pidfile.remove()  # removing twice is fine: `down` runs on a stopped stack too
    assert not pidfile.path.exists()


# -- kafka ---------------------------------------------------------------------------------


def test_server_properties_put_both_listeners_on_loopback(tmp_path: Path) -> None:
    text = _server_properties(DEFAULT, tmp_path / "data", 19092, 19093)
    lines = text.splitlines()
    props = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert len(props) == len([line for line in lines if line and not line.startswith("#")])
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.security.protocol.map"] == "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"
    assert text.endswith("\n")


def test_a_proxied_listener_advertises_its_proxy(tmp_path: Path) -> None:
    proxied = [ProxiedListener("AGENTS", 19094, "127.0.0.1:29094")]
    text = _server_properties(DEFAULT, tmp_path / "data", 19092, 19093, proxied=proxied)
    props = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,AGENTS://127.0.0.1:19094,CONTROLLER://127.0.0.1:19093"
    )
    assert props["advertised.listeners"] == ("PLAINTEXT://127.0.0.1:19092,AGENTS://127.0.0.1:29094")
    assert props["listener.security.protocol.map"] == (
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,AGENTS:PLAINTEXT"
    )
    assert props["inter.broker.listener.name"] == "PLAINTEXT"  # the broker's own way: direct


# -- the stack's directories as root, against another local user (see test_safe_dirs) ------


def _fake_binaries(bindir: Path) -> postgres.Binaries:
    """initdb and postgres that only say so: nothing here gets as far as running them."""
    bindir.mkdir()
    for name in ("initdb", "postgres"):
        (bindir / name).write_text(f"#!/bin/sh\necho {name} ran\n")
        (bindir / name).chmod(0o755)
    return postgres.Binaries(bindir, 17)


@pytest.fixture
def server_home(shared_tmp: Path, tmp_path: Path) -> Path:
    """A stack's PostgreSQL home; its data directory in ``shared_tmp``."""
    return tmp_path / "stack" / "postgres"


def _server(home: Path, tmp_path: Path) -> postgres.PostgresServer:
    ca = tls.ensure_ca(tmp_path / "tls")
    certificate = tls.issue_server_cert(ca, tmp_path / "tls", "postgres")
    bindir = Path(tempfile.gettempdir()) / "bin"  # postgres runs them
    return postgres.PostgresServer(home, _fake_binaries(bindir), certificate)


def test_as_root_a_link_planted_at_the_data_directorys_path_is_refused(
    server_home: Path, tmp_path: Path
) -> None:
    """The data directory's path under /tmp is predictable; a link there must not make root
    hand the directory it points at to postgres (who, as the cluster's superuser, runs
    programs with COPY TO PROGRAM)."""
    planted = postgres.data_dir(server_home).parent
    target = victim(tmp_path / "theirs")
    before = snapshot(target)
    planted.symlink_to(target)
    os.lchown(planted, NOBODY.pw_uid, NOBODY.pw_gid)
    server = _server(server_home, tmp_path)
    with pytest.raises(DevStackError, match=f"^{planted} is a symbolic link of nobody"):
        server.start(choose_port(0))
    assert snapshot(target) == before
    assert not (server_home / "postgres.pid").exists()


def test_as_root_a_data_directory_another_user_made_is_refused(
    server_home: Path, tmp_path: Path
) -> None:
    theirs = victim(postgres.data_dir(server_home).parent)
    (theirs / "pgdata").mkdir()
    os.chown(theirs / "pgdata", NOBODY.pw_uid, NOBODY.pw_gid)
    before = snapshot(theirs)
    with pytest.raises(DevStackError, match=f"^{theirs} belongs to nobody"):
        _server(server_home, tmp_path).start(choose_port(0))
    assert snapshot(theirs) == before


def test_as_root_the_data_directory_is_postgress_in_a_directory_of_roots(
    server_home: Path, tmp_path: Path
) -> None:
    data = postgres.data_dir(server_home)
    data.parent.mkdir()  # as the older layout left it: postgres's
    os.chown(data.parent, SERVER.pw_uid, SERVER.pw_gid)
    server = _server(server_home, tmp_path)
    server.start(choose_port(0))  # the fake initdb and postgres run and exit
    assert (data.parent.stat().st_uid, stat.S_IMODE(data.parent.stat().st_mode)) == (0, 0o755)
    assert snapshot(data) == [
        (str(data), SERVER.pw_uid, SERVER.pw_gid, 0o700),
        *(
            (str(data / name), SERVER.pw_uid, SERVER.pw_gid, mode)
            for name, mode in (("pg_hba.conf", 0o600), ("server.crt", 0o644), ("server.key", 0o600))
        ),
    ]


def test_a_servers_log_is_readable_by_this_user_only(tmp_path: Path) -> None:
    """A server logs a failed statement whole: the log is not for other users to read."""
    log = tmp_path / "server.log"
    log.write_text("an older log\n")
    log.chmod(0o644)
    pid = spawn([sys.executable, "-c", "print('started')"], log)
    assert wait_exit(pid, 30.0)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_text() == "an older log\nstarted\n"
