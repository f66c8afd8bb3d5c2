"""The local stack: one Kafka broker and one PostgreSQL server on 127.0.0.1.

Everything lives under a stack home (default ``$XDG_CACHE_HOME/agent-pipeline/dev``, or
``PIPELINE_DEV_HOME``): the chosen ports, pid files, logs and Kafka's data. The broker's jars
are shared by every stack under ``$XDG_CACHE_HOME/agent-pipeline/kafka-<version>``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.devstack import kafka, postgres
from pipeline.devstack.processes import PidFile, choose_port, stop_pid
from pipeline.errors import DevStackError

KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"
DATABASE_ENV = "DATABASE_URL"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_PG_PORT = 5432
READY_TIMEOUT = 90.0

Report = Callable[[str], None]


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    database_url: str

    def exports(self) -> str:
        return (
            f"export {KAFKA_ENV}={self.kafka_bootstrap}\n"
            f"export {DATABASE_ENV}={self.database_url}\n"
        )


def endpoints_from_env(environ: Mapping[str, str] = os.environ) -> Endpoints | None:
    """The endpoints given by the environment, None when neither is set."""
    bootstrap, url = environ.get(KAFKA_ENV), environ.get(DATABASE_ENV)
    if not bootstrap and not url:
        return None
    if not bootstrap or not url:
        missing = KAFKA_ENV if not bootstrap else DATABASE_ENV
        present = DATABASE_ENV if not bootstrap else KAFKA_ENV
        raise DevStackError(
            f"{present} is set but {missing} is not: set both to use your own servers, "
            "or unset both to use the local stack"
        )
    return Endpoints(bootstrap, url)


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agent-pipeline"


def default_home(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("PIPELINE_DEV_HOME") or cache_root(environ) / "dev")


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str  # "running", "stopped" or "dead"
    pid: int | None
    port: int | None
    detail: str

    def line(self) -> str:
        where = f" on 127.0.0.1:{self.port}" if self.port and self.state == "running" else ""
        pid = f" (pid {self.pid})" if self.pid else ""
        return f"{self.name}: {self.state}{pid}{where}{self.detail}"


class Stack:
    """Start, inspect and stop the local stack. Every method is idempotent."""

    def __init__(self, home: Path | None = None, jar_cache: Path | None = None) -> None:
        self.home = home or default_home()
        self._jar_cache = jar_cache or cache_root()
        self._state_path = self.home / "state.json"
        self._pg_home = self.home / "postgres"
        self._kafka_home = self.home / "kafka"

    # -- commands ---------------------------------------------------------------------

    def up(self, report: Report = print) -> Endpoints:
        """Start whatever is not running, wait until both answer, return the endpoints."""
        with self._locked():
            state = self._read_state()
            pg_server = postgres.PostgresServer(self._pg_home, postgres.find_binaries())
            broker = kafka.KafkaBroker(self._kafka_home, kafka.resolve_jars(self._jar_cache))

            if pg_server.pidfile.live_pid() is None:
                pg_server.pidfile.remove()
                state["pg_port"] = self._port(
                    state.get("pg_port"), DEFAULT_PG_PORT, report, "PostgreSQL"
                )
                self._write_state(state)
                pid = pg_server.start(state["pg_port"])
                report(f"PostgreSQL {pg_server.binaries.major} starting (pid {pid})")
            pg_server.wait_ready(state["pg_port"], READY_TIMEOUT)

            if broker.pidfile.live_pid() is None:
                broker.pidfile.remove()
                taken = {state["pg_port"]}
                state["kafka_port"] = self._port(
                    state.get("kafka_port"), DEFAULT_KAFKA_PORT, report, "Kafka", taken
                )
                taken.add(state["kafka_port"])
                state["controller_port"] = self._port(
                    state.get("controller_port"), DEFAULT_KAFKA_PORT + 1, report, None, taken
                )
                self._write_state(state)
                pid = broker.start(state["kafka_port"], state["controller_port"])
                report(f"Kafka {kafka.KAFKA_VERSION} starting (pid {pid})")
            endpoints = self._endpoints(state)
            broker.wait_ready(endpoints.kafka_bootstrap, READY_TIMEOUT)
            return endpoints

    def down(self, purge: bool = False, report: Report = print) -> None:
        """Stop both servers by their pids and wait for them to exit; ``purge`` deletes data."""
        with self._locked():
            for name, pidfile, sig in (
                ("Kafka", kafka.pidfile(self._kafka_home), signal.SIGTERM),  # controlled shutdown
                ("PostgreSQL", postgres.pidfile(self._pg_home), signal.SIGINT),  # fast shutdown
            ):
                pid = pidfile.live_pid()
                if pid is not None:
                    clean = stop_pid(pid, sig, timeout=60.0)
                    report(f"{name} stopped (pid {pid}{'' if clean else ', killed'})")
                pidfile.remove()
            if purge:
                postgres.purge(self._pg_home)
                shutil.rmtree(self.home, ignore_errors=True)
                report(f"removed {self.home}")

    def status(self) -> list[ComponentStatus]:
        state = self._read_state()
        return [
            _component(
                "PostgreSQL",
                postgres.pidfile(self._pg_home),
                state.get("pg_port"),
                self._pg_home / "postgres.log",
            ),
            _component(
                "Kafka",
                kafka.pidfile(self._kafka_home),
                state.get("kafka_port"),
                self._kafka_home / "broker.log",
            ),
        ]

    def endpoints(self) -> Endpoints:
        """The endpoints of the running stack; an error when it is not up."""
        states = self.status()
        if any(s.state != "running" for s in states):
            raise DevStackError(
                "the local stack is not running ("
                + "; ".join(s.line() for s in states)
                + "): start it with `pipeline dev up`"
            )
        return self._endpoints(self._read_state())

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _endpoints(state: Mapping[str, int]) -> Endpoints:
        return Endpoints(f"127.0.0.1:{state['kafka_port']}", postgres.dsn(state["pg_port"]))

    @staticmethod
    def _port(
        remembered: int | None,
        default: int,
        report: Report,
        name: str | None,
        taken: set[int] | None = None,
    ) -> int:
        wanted = remembered or default
        port = choose_port(wanted, taken or set())
        if port != wanted and name:
            report(f"port {wanted} is taken; {name} uses port {port}")
        return port

    def _read_state(self) -> dict[str, int]:
        try:
            data = json.loads(self._state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {k: int(v) for k, v in data.items()}

    def _write_state(self, state: Mapping[str, int]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(state), indent=2) + "\n")
        os.replace(tmp, self._state_path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up`/`down` at a time per stack home (parallel test workers, two shells)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with (self.home / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _component(name: str, pidfile: PidFile, port: int | None, log: Path) -> ComponentStatus:
    pid = pidfile.live_pid()
    if pid is not None:
        return ComponentStatus(name, "running", pid, port, "")
    stale = pidfile.read()
    if stale is not None:
        return ComponentStatus(
            name, "dead", None, port, f": pid file names {stale}, which is not running; see {log}"
        )
    return ComponentStatus(name, "stopped", None, port, "")
