"""The local stack: one Kafka broker and one PostgreSQL server on 127.0.0.1.

Everything lives under a stack home (default ``$XDG_CACHE_HOME/agent-pipeline/dev``, or
``PIPELINE_DEV_HOME``): the chosen ports, pid files, logs and Kafka's data, with the Kafka
release that formatted it. The broker's jars are shared by every stack under
``$XDG_CACHE_HOME/agent-pipeline/kafka-<version>``, and so are PostgreSQL's binaries when they
come from Maven Central (``postgresql-<version>``). ``PIPELINE_DEV_KAFKA`` chooses the Kafka
release (:mod:`pipeline.devstack.kafka_versions`), ``PIPELINE_DEV_POSTGRES`` the PostgreSQL
major (:mod:`pipeline.devstack.pg_binaries`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import control, kafka_clients
from pipeline.config import redact_url
from pipeline.devstack import kafka, kafka_auth, kafka_versions, postgres, safe_dirs, tls
from pipeline.devstack.processes import PidFile, choose_port, port_is_free, stop_pid
from pipeline.errors import ConfigError, DevStackError
from pipeline.kafka_clients import KafkaSettings, settings_from_env

KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"
DATABASE_ENV = "DATABASE_URL"
MIGRATE_DATABASE_ENV = "PIPELINE_MIGRATE_DATABASE_URL"
PRIVATE_KEY_ENV = "PIPELINE_CONTROL_PRIVATE_KEY_FILE"
PUBLIC_KEYS_ENV = "PIPELINE_CONTROL_PUBLIC_KEYS"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_KAFKA_SECURE_PORT = 9094
DEFAULT_PG_PORT = 5432
READY_TIMEOUT = 90.0
PROBE_TIMEOUT = 5.0  # how long `status` waits for each server to answer
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

Report = Callable[[str], None]
NO_SECURE_LISTENER = (
    "the local stack's Kafka broker has no SASL_SSL listener yet (it was started before the "
    "stack had one): restart it with `pipeline dev down && pipeline dev up` (its data is kept)"
)


@dataclass(frozen=True)
class SecureKafka:
    """The local stack's SASL_SSL listener, and what a client needs to use it: the CA that
    signed the broker's certificate, and the directory of the users' password files."""

    bootstrap: str
    cafile: Path
    secrets: Path

    def settings(self, user: str, client_id: str = "") -> KafkaSettings:
        """How ``user`` (one of :data:`pipeline.devstack.kafka_auth.USERS`) connects."""
        return KafkaSettings(
            bootstrap_servers=self.bootstrap,
            client_id=client_id,
            security_protocol="SASL_SSL",
            sasl_mechanism=kafka_auth.MECHANISM,
            ssl_cafile=str(self.cafile),
            sasl_username=user,
            sasl_password_file=str(kafka_auth.password_file(self.secrets, user)),
        )

    def exports(self, user: str) -> str:
        """Export lines for ``user``'s settings: they name the password file, never hold it."""
        variables = self.settings(user).environment()
        return "".join(
            f"export {name}={shlex.quote(value)}\n" for name, value in variables.items() if value
        )


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    database_url: str
    # The local stack's control key pair (private, public), for `pipeline control` and the
    # agents; None for servers from the environment.
    control_keys: tuple[Path, Path] | None = None
    # How Kafka's clients connect, when more than the bootstrap servers (the environment's
    # PIPELINE_KAFKA_* security settings); None means plaintext.
    kafka_settings: KafkaSettings | None = field(default=None, compare=False)
    # The local stack's SASL_SSL listener; None for servers from the environment, and for a
    # broker started before the stack had one.
    kafka_secure: SecureKafka | None = field(default=None, compare=False)
    # The migrator's URL (`pipeline migrate`), when it is not database_url's login.
    migrate_database_url: str | None = None

    def exports(self, secure_user: str | None = None) -> str:
        """Export lines for a shell; with ``secure_user``, Kafka's are those of the SASL_SSL
        listener as that user (:meth:`SecureKafka.exports`)."""
        if secure_user is None:
            lines = f"export {KAFKA_ENV}={self.kafka_bootstrap}\n"
        elif self.kafka_secure is None:
            raise DevStackError(NO_SECURE_LISTENER)
        else:
            lines = self.kafka_secure.exports(secure_user)
        lines += f"export {DATABASE_ENV}={shlex.quote(self.database_url)}\n"
        if self.migrate_database_url is not None:
            lines += f"export {MIGRATE_DATABASE_ENV}={shlex.quote(self.migrate_database_url)}\n"
        if self.control_keys is not None:
            private, public = (shlex.quote(str(p)) for p in self.control_keys)
            lines += f"export {PRIVATE_KEY_ENV}={private}\nexport {PUBLIC_KEYS_ENV}={public}\n"
        return lines

    @property
    def kafka(self) -> KafkaSettings:
        """Kafka's connection settings, for :mod:`pipeline.kafka_clients`."""
        return self.kafka_settings or KafkaSettings(bootstrap_servers=self.kafka_bootstrap)


@dataclass(frozen=True)
class Answer:
    """Whether one server answers: Kafka through the protocol, PostgreSQL a query."""

    name: str  # "PostgreSQL" or "Kafka"
    address: str  # the bootstrap servers, or the URL without its password
    variable: str  # the environment variable that names it
    problem: str | None  # None when it answers

    def line(self) -> str:
        answers = "answers" if self.problem is None else "does not answer"
        problem = "" if self.problem is None else f": {self.problem}"
        return f"{self.name}: {answers} at {self.address} ({self.variable}){problem}"


def probe_servers(endpoints: Endpoints, timeout: float = PROBE_TIMEOUT) -> list[Answer]:
    """Ask both servers, at once, whether they answer; PostgreSQL first, as `status` lists."""

    async def both() -> list[str | None]:
        return list(
            await asyncio.gather(
                postgres.why_not_answering(endpoints.database_url, timeout),
                kafka.why_not_answering(endpoints.kafka, timeout),
            )
        )

    pg_problem, kafka_problem = asyncio.run(both())
    return [
        Answer("PostgreSQL", redact_url(endpoints.database_url), DATABASE_ENV, pg_problem),
        Answer("Kafka", endpoints.kafka_bootstrap, KAFKA_ENV, kafka_problem),
    ]


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
    return Endpoints(
        bootstrap,
        url,
        kafka_settings=settings_from_env(environ),
        migrate_database_url=environ.get(MIGRATE_DATABASE_ENV) or None,
    )


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
    answers: bool | None = None  # None when not asked (see Stack.status)
    # Of the data: PostgreSQL's major, Kafka's release that formatted it; None before any.
    version: str | None = None

    @property
    def serving(self) -> bool:
        """Running, and (when asked) answering."""
        return self.state == "running" and self.answers is not False

    def line(self) -> str:
        where = f" on 127.0.0.1:{self.port}" if self.port and self.state == "running" else ""
        pid = f" (pid {self.pid})" if self.pid else ""
        version = f" {self.version}" if self.version else ""
        return f"{self.name}{version}: {self.state}{pid}{where}{self.detail}"


class Stack:
    """Start, inspect and stop the local stack. Every method is idempotent."""

    def __init__(
        self,
        home: Path | None = None,
        jar_cache: Path | None = None,
        kafka_version: str | None = None,
    ) -> None:
        self.home = home or default_home()
        self._jar_cache = jar_cache or cache_root()
        # The Kafka release `up` runs: the argument (`dev up --kafka`), else PIPELINE_DEV_KAFKA.
        # Checked by `up` alone: `down` and `status` work on any home whatever it says.
        self._kafka_version = kafka_version
        self._state_path = self.home / "state.json"
        self._pg_home = self.home / "postgres"
        self._kafka_home = self.home / "kafka"
        self._tls_dir = self.home / "tls"
        self._secrets_dir = self.home / "secrets"

    # -- commands ---------------------------------------------------------------------

    def up(self, report: Report = print) -> Endpoints:
        """Start whatever is not running, wait until both answer, return the endpoints."""
        release = self._kafka_release()
        with self._locked():
            kafka.check_data_version(self._kafka_home, release.version)  # before starting any
            state = self._read_state()
            pg_certificate = tls.issue_server_cert(self.ca(), self._tls_dir, "postgres")
            binaries = postgres.resolve_binaries(self._pg_home, self._jar_cache, report)
            pg_server = postgres.PostgresServer(self._pg_home, binaries, pg_certificate)
            broker = kafka.KafkaBroker(
                self._kafka_home, kafka.resolve_jars(self._jar_cache, release), release
            )

            if pg_server.pidfile.live_pid() is None:
                pg_server.pidfile.remove()
                state["pg_port"] = self._port(
                    state.get("pg_port"), DEFAULT_PG_PORT, report, "PostgreSQL"
                )
                self._write_state(state)
                pid = pg_server.start(state["pg_port"])
                report(f"PostgreSQL {pg_server.binaries.major} starting (pid {pid})")
            pg_server.wait_ready(state["pg_port"], READY_TIMEOUT, self._secrets_dir)

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
                taken.add(state["controller_port"])
                state["kafka_secure_port"] = self._port(
                    state.get("kafka_secure_port"), DEFAULT_KAFKA_SECURE_PORT, report, None, taken
                )
                self._write_state(state)
                ca = tls.ensure_ca(self._tls_dir)
                cert = tls.issue_server_cert(ca, self._tls_dir, "kafka")
                secure = kafka.SecureListener(state["kafka_secure_port"], cert.cert, cert.key)
                pid = broker.start(state["kafka_port"], state["controller_port"], secure)
                report(f"Kafka {release.version} starting (pid {pid})")
            self._ensure_control_keys(report)
            broker.wait_ready(self._endpoints(state).kafka, READY_TIMEOUT)
            if kafka.has_secure_listener(self._kafka_home):
                self._ensure_kafka_users()
            else:
                report(
                    "the running Kafka broker was started before the stack had its SASL_SSL "
                    "listener; `pipeline dev down && pipeline dev up` restarts it with one "
                    "(its data is kept)"
                )
            return self._endpoints(state)

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

    def status(self, probe: bool = False) -> list[ComponentStatus]:
        """Each server's process, by its pid file; with ``probe``, whether a running one also
        answers (Kafka through the protocol, PostgreSQL a query)."""
        state = self._read_state()
        found = [
            dataclasses.replace(
                _component(
                    "PostgreSQL",
                    postgres.pidfile(self._pg_home),
                    state.get("pg_port"),
                    self._pg_home / "postgres.log",
                ),
                version=str(postgres.data_major(self._pg_home) or "") or None,
            ),
            dataclasses.replace(
                _component(
                    "Kafka",
                    kafka.pidfile(self._kafka_home),
                    state.get("kafka_port"),
                    self._kafka_home / "broker.log",
                ),
                version=kafka.data_version(self._kafka_home),
            ),
        ]
        return [_asked(c) if probe and c.state == "running" else c for c in found]

    def recorded_endpoints(self) -> Endpoints | None:
        """The endpoints this stack listens on when it runs (the ports it last chose), whether
        it runs or not; None before its first `up` or after a purge."""
        state = self._read_state()
        if "kafka_port" not in state or "pg_port" not in state:
            return None
        return self._endpoints(state)

    def serves(self, endpoints: Endpoints) -> bool:
        """True when ``endpoints`` name this stack's own servers (its recorded ports on the
        loopback): what `eval "$(pipeline dev env)"` exported, say.

        Not when the stack is stopped and other processes listen on both its ports (a Docker
        stack on the default ports, say): then the endpoints reach those.
        """
        own = self.recorded_endpoints()
        if own is None:
            return False
        kafka_addresses = [_addresses(own.kafka_bootstrap)]
        if own.kafka_secure is not None:
            kafka_addresses.append(_addresses(own.kafka_secure.bootstrap))
        if _addresses(endpoints.kafka_bootstrap) not in kafka_addresses or (
            _database_address(endpoints.database_url) != _database_address(own.database_url)
        ):
            return False
        states = self.status()
        return any(s.state == "running" for s in states) or any(
            s.port is not None and port_is_free(s.port) for s in states
        )

    def endpoints(self, tls: bool = False) -> Endpoints:
        """The endpoints of the running stack; an error when it is not up. With ``tls``, the
        database URLs verify the server's certificate against the stack's CA."""
        states = self.status()
        if any(s.state != "running" for s in states):
            raise DevStackError(
                "the local stack is not running ("
                + "; ".join(s.line() for s in states)
                + "): start it with `pipeline dev up`"
            )
        endpoints = self._endpoints(self._read_state())
        if not tls:
            return endpoints
        assert endpoints.migrate_database_url is not None
        return dataclasses.replace(
            endpoints,
            database_url=postgres.with_tls(endpoints.database_url, self.ca().cert),
            migrate_database_url=postgres.with_tls(endpoints.migrate_database_url, self.ca().cert),
        )

    def ca(self) -> tls.KeyPair:
        """The stack's certificate authority (made on first use): clients trust its cert."""
        return tls.ensure_ca(self._tls_dir)

    def logins(self) -> postgres.Logins:
        """PostgreSQL's logins, and their password files (made by `up`)."""
        return postgres.logins(self._secrets_dir)

    def admin_url(self) -> str:
        """The superuser's URL to the pipeline database: for the tests and `pipeline bench`,
        which create databases; every other command connects as a login."""
        return postgres.dsn(self._read_state()["pg_port"])

    def kafka_secrets(self) -> Path:
        """The directory of the stack's Kafka users' password files (0600 each)."""
        return self._secrets_dir

    def control_keys(self) -> tuple[Path, Path]:
        """Where the stack keeps its control key pair: (private, public)."""
        keys = self.home / "keys"
        return keys / "antigravity.key", keys / "antigravity.pub"

    # -- helpers ----------------------------------------------------------------------

    def _kafka_release(self) -> kafka_versions.Release:
        if self._kafka_version:
            return kafka_versions.release(self._kafka_version, "--kafka")
        return kafka_versions.release(kafka_versions.chosen(os.environ))

    def _endpoints(self, state: Mapping[str, int]) -> Endpoints:
        keys = self.control_keys()
        bootstrap = f"127.0.0.1:{state['kafka_port']}"
        server = postgres.dsn(state["pg_port"])
        logins = self.logins()
        return Endpoints(
            bootstrap,
            logins.agent.url(server),
            keys if all(p.exists() for p in keys) else None,
            # The stack's own plaintext listener, whatever PIPELINE_KAFKA_* says.
            kafka_settings=KafkaSettings(bootstrap_servers=bootstrap),
            kafka_secure=self._secure_kafka(state),
            migrate_database_url=logins.migrator.url(server),
        )

    def _secure_kafka(self, state: Mapping[str, int]) -> SecureKafka | None:
        secrets = self.kafka_secrets()
        ready = (
            "kafka_secure_port" in state
            and kafka.has_secure_listener(self._kafka_home)
            and all(kafka_auth.password_file(secrets, u).exists() for u in kafka_auth.USERS)
        )
        if not ready:
            return None
        return SecureKafka(
            f"127.0.0.1:{state['kafka_secure_port']}", self._tls_dir / "ca.crt", secrets
        )

    def _ensure_kafka_users(self) -> None:
        """The SCRAM users (random passwords, made once) and the ACLs of the stack's default
        topics and group, over the plaintext listener (its super user), then a log-in as each
        user. Idempotent, and well under a second: done on every `up`."""
        secrets = self.kafka_secrets()
        passwords = {u: kafka_auth.ensure_password_file(secrets, u) for u in kafka_auth.USERS}
        state = self._read_state()
        admin = KafkaSettings(bootstrap_servers=f"127.0.0.1:{state['kafka_port']}")
        acls = kafka_auth.pipeline_acls(catalog=kafka_auth.environment_catalog())
        asyncio.run(kafka_auth.set_up(admin, passwords, acls))
        secure = self._secure_kafka(state)
        if secure is None:
            raise DevStackError(NO_SECURE_LISTENER)
        asyncio.run(_until_users_log_in(secure))

    def _ensure_control_keys(self, report: Report) -> None:
        """A key pair for the control plane on first `up`: the private key signs `pipeline
        control` commands, the agents trust the public one."""
        private, public = self.control_keys()
        if private.exists() and public.exists():
            return
        private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in (private, public):
            path.unlink(missing_ok=True)  # half a pair is no pair
        key, public_key = control.generate_key_pair()
        control.write_private_key_file(private, key)
        control.write_public_key_file(public, public_key)
        report(f"control key pair (id {control.key_id(public_key)}) written to {private.parent}")

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
        """One `up`/`down` at a time per stack home (parallel test workers, two shells). The
        home is made, or checked, as :mod:`pipeline.devstack.safe_dirs` says: it may be under
        the system temp dir (PIPELINE_DEV_HOME), and root hands some of it to ``postgres``."""
        safe_dirs.ensure_dir(self.home, 0o700)
        with (self.home / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


async def _until_users_log_in(secure: SecureKafka, within: float = 30.0) -> None:
    """Wait until every user authenticates on the SASL_SSL listener: a new SCRAM credential
    reaches the broker a moment after AlterUserScramCredentials returns."""
    deadline = time.monotonic() + within
    for user in kafka_auth.USERS:
        while True:
            try:
                await kafka_clients.check_connection(secure.settings(user), PROBE_TIMEOUT)
                break
            except ConfigError as exc:
                if time.monotonic() > deadline:
                    raise DevStackError(
                        f"{user} cannot log in on the SASL_SSL listener: {exc}"
                    ) from None
                await asyncio.sleep(0.05)


def _addresses(bootstrap: str) -> set[tuple[str, int | None]]:
    return {_host_and_port(f"//{a.strip()}") for a in bootstrap.split(",") if a.strip()}


def _database_address(url: str) -> tuple[str, int | None]:
    return _host_and_port(url)


def _host_and_port(url: str) -> tuple[str, int | None]:
    """(host, port) of a URL, every name of the loopback as 127.0.0.1; the URL itself when it
    does not parse (then it matches only itself)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return (url, None)
    return ("127.0.0.1" if host in _LOOPBACK else host, port)


def _asked(component: ComponentStatus) -> ComponentStatus:
    """``component`` (running), with whether its server answers on its port."""
    if component.port is None:
        problem: str | None = "its port is not recorded in the stack home"
    elif component.name == "PostgreSQL":
        url = postgres.dsn(component.port)
        problem = asyncio.run(postgres.why_not_answering(url, PROBE_TIMEOUT))
    else:
        plaintext = KafkaSettings(bootstrap_servers=f"127.0.0.1:{component.port}")
        problem = asyncio.run(kafka.why_not_answering(plaintext, PROBE_TIMEOUT))
    if problem is None:
        return dataclasses.replace(component, answers=True)
    return dataclasses.replace(
        component, answers=False, detail=f"{component.detail}, but does not answer: {problem}"
    )


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
