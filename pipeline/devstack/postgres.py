"""A PostgreSQL server (13 to 17: the machine's own, or a build from Maven Central, see
:mod:`pipeline.devstack.pg_binaries`), tuned for bulk ingestion, with the pipeline's logins
(docs/security.md) and TLS."""

from __future__ import annotations

import asyncio
import base64
import glob
import hashlib
import hmac
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from pipeline.devstack import pg_binaries, safe_dirs
from pipeline.devstack.pg_binaries import Report
from pipeline.devstack.processes import PidFile, is_alive, log_tail, spawn
from pipeline.devstack.tls import KeyPair
from pipeline.errors import DevStackError

SUPERUSER = "pipeline"  # the stack's administrator: creates the logins and databases
DATABASE = "pipeline"
UNPRIVILEGED_USER = "postgres"
# The logins (docs/security.md): the migrator owns the schema; the agent has only the writer
# role, the analyst only the reader role. The group roles are the migrations' (003_roles.sql).
MIGRATOR = "pipeline_migrator"
AGENT = "pipeline_agent"
ANALYST = "pipeline_analyst"
GROUP_OF = {AGENT: "pipeline_writer", ANALYST: "pipeline_reader"}
SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)

# Who may connect how (no unix socket: loopback TCP only). The superuser without a password,
# for the stack's own administration and the tests' (a development server, reachable from
# this machine only); every other login with its SCRAM password. TLS is offered to all and
# required of none: a client asks for it with sslmode in its URL (the stack's own URLs say
# sslmode=disable unless TLS was asked for: see dsn).
PG_HBA = f"""# Written by `pipeline dev up` on every start.
host all {SUPERUSER} 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""

# Settings for a throwaway server that takes bulk COPY: a large WAL budget so checkpoints do
# not throttle COPY, no unix socket (loopback TCP only, no /var/run permissions needed).
# fsync stays on: the DatabaseAgent turns synchronous_commit off per session, which is safe
# because data and offsets commit together; fsync=off would be a lie about durability.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "300",
    "shared_buffers": "1GB",
    "maintenance_work_mem": "256MB",
    "work_mem": "16MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "wal_buffers": "64MB",
    "wal_compression": "on",
    "log_min_messages": "warning",
    "log_connections": "off",
    "password_encryption": "scram-sha-256",
    "ssl": "on",  # with server.crt and server.key in the data directory (PostgresServer.start)
}

_SEARCH_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/usr/local/pgsql/bin",  # built from source
    "/opt/homebrew/opt/postgresql@*/bin",  # macOS, Homebrew (Apple silicon)
    "/usr/local/opt/postgresql@*/bin",  # macOS, Homebrew (Intel)
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)


@dataclass(frozen=True)
class Binaries:
    bindir: Path
    major: int

    @property
    def postgres(self) -> str:
        return str(self.bindir / "postgres")

    @property
    def initdb(self) -> str:
        return str(self.bindir / "initdb")


def resolve_binaries(home: Path, cache_dir: Path, report: Report) -> Binaries:
    """The server the stack in ``home`` runs: as ``PIPELINE_DEV_POSTGRES`` and
    ``PIPELINE_PG_BINDIR`` ask (:func:`pg_binaries.wanted`), the machine's own when it has
    that major, else downloaded from Maven Central into ``cache_dir``. Refused when it is not
    the major of the stack's data directory."""
    found_major = data_major(home)
    bindir = os.environ.get(pg_binaries.BINDIR_ENV) or None
    want = pg_binaries.wanted(
        pg_binaries.parse_choice(os.environ.get(pg_binaries.ENV)), found_major, bindir
    )
    binaries = _machine_binaries(want.major)
    if binaries is None and want.download and want.major is None:
        binaries = _downloaded(pg_binaries.NEWEST, cache_dir, report)
    elif binaries is None and want.download and want.major in pg_binaries.PINNED:
        binaries = _downloaded(want.major, cache_dir, report)
    elif binaries is None:
        raise DevStackError(_not_found(want))
    if found_major is not None and binaries.major != found_major:
        raise DevStackError(
            pg_binaries.data_mismatch(
                found_major, binaries.major, f"{want.asked_by}, {binaries.bindir}"
            )
        )
    return binaries


def find_binaries() -> Binaries:
    """The machine's own server: ``PIPELINE_PG_BINDIR``, ``pg_config``, PATH, install dirs."""
    binaries = _machine_binaries(None)
    if binaries is None:
        raise DevStackError(_not_found(pg_binaries.Wanted(None, False, "")))
    return binaries


def _machine_binaries(major: int | None) -> Binaries | None:
    """The first server of the machine's of ``major`` (any, when None); with
    ``PIPELINE_PG_BINDIR``, that directory's, which must be of ``major``."""
    if explicit := os.environ.get(pg_binaries.BINDIR_ENV):
        if not _has_server(Path(explicit)):
            return None
        binaries = Binaries(Path(explicit), _major_of(Path(explicit)))
        if major is not None and binaries.major != major:
            raise DevStackError(
                f"{pg_binaries.BINDIR_ENV}={explicit} is PostgreSQL {binaries.major}, but "
                f"PostgreSQL {major} is asked for ({pg_binaries.ENV}, or the stack's data "
                f"directory): unset {pg_binaries.BINDIR_ENV}, or point it at PostgreSQL {major}"
            )
        return binaries
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    if on_path := shutil.which("postgres"):
        candidates.append(Path(on_path).resolve().parent)
    for pattern in _SEARCH_GLOBS:
        candidates.extend(Path(p) for p in sorted(glob.glob(pattern), reverse=True))
    for bindir in dict.fromkeys(c.resolve() for c in candidates if _has_server(c)):
        found = _major_of(bindir)
        if major is None or found == major:
            return Binaries(bindir, found)
    return None


def _downloaded(major: int, cache_dir: Path, report: Report) -> Binaries:
    bindir = pg_binaries.install(major, cache_dir, report)
    found = _major_of(bindir)
    if found != major:
        raise DevStackError(f"{bindir} holds PostgreSQL {found}, not {major}: delete it")
    return Binaries(bindir, found)


def _not_found(want: pg_binaries.Wanted) -> str:
    where = os.environ.get(pg_binaries.BINDIR_ENV) or "pg_config, PATH or " + ", ".join(
        _SEARCH_GLOBS
    )
    major = "" if want.major is None else f" {want.major}"
    found = f"PostgreSQL{major} server binaries (postgres, initdb) not found in {where}"
    if want.major is not None and want.major not in pg_binaries.PINNED:
        return (
            f"{found}, which {want.asked_by} needs, and the builds that `pipeline dev up` "
            f"downloads from Maven Central are {pg_binaries.SUPPORTED_TEXT} only. Install "
            f"PostgreSQL{major} (or set {pg_binaries.BINDIR_ENV} to its bin directory), delete "
            "the stack's data with `pipeline dev down --purge` (it is lost), or use another "
            "stack home (PIPELINE_DEV_HOME)."
        )
    return (
        f"{found}. Install the server (Debian: apt-get install postgresql; Fedora: dnf "
        "install postgresql-server; macOS: brew install postgresql@15), or set "
        f"{pg_binaries.BINDIR_ENV} to its bin directory, or have `pipeline dev up` download "
        f"it from Maven Central: unset {pg_binaries.BINDIR_ENV} and set {pg_binaries.ENV} to "
        f"a major, {pg_binaries.SUPPORTED_TEXT}."
    )


def _has_server(bindir: Path) -> bool:
    return (bindir / "postgres").is_file() and (bindir / "initdb").is_file()


def _major_of(bindir: Path) -> int:
    """The major of the server in ``bindir``, from ``postgres --version``: also proves that it
    runs here (its shared libraries are found)."""
    try:
        result = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise DevStackError(f"{bindir / 'postgres'} does not run here: {exc}") from None
    match = re.search(r"PostgreSQL\) (\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise DevStackError(
            f"{bindir / 'postgres'} does not run here or says no version: "
            f"{(result.stdout + result.stderr).strip()[-500:]!r}"
        )
    return int(match.group(1))


def data_major(home: Path) -> int | None:
    """The major of PostgreSQL that made the stack's data directory (its ``PG_VERSION``),
    None when it has none."""
    try:
        return int((data_dir(home) / "PG_VERSION").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


class PostgresServer:
    """One PostgreSQL cluster: ``initdb`` once, started on 127.0.0.1, stopped by its pid.

    PostgreSQL refuses to run as root. When this process is root, the server runs as the
    unprivileged ``postgres`` user, and its data directory lives where that user can reach
    it (under the system temp dir, named after ``home``), owned by it.
    """

    def __init__(self, home: Path, binaries: Binaries, certificate: KeyPair) -> None:
        self.home = home
        self.binaries = binaries
        self.certificate = certificate  # the server's, signed by the stack's CA
        self.run_as = _unprivileged_user() if os.geteuid() == 0 else None
        self.data_dir = data_dir(home)
        self.log_path = home / "postgres.log"
        self.pidfile = pidfile(home)

    def start(self, port: int) -> int:
        safe_dirs.ensure_dir(self.home, 0o700)
        self._initdb_once()
        self._remove_stale_lock()
        self._write_access_files()
        args = [self.binaries.postgres, "-D", str(self.data_dir), "-p", str(port)]
        for name, value in SERVER_SETTINGS.items():
            args += ["-c", f"{name}={value}"]
        pid = spawn(args, self.log_path, cwd=self.data_dir, **self._user_kwargs())
        self.pidfile.write(pid)
        return pid

    def _initdb_once(self) -> None:
        self._prepare_data_dir()
        if (self.data_dir / "PG_VERSION").exists():  # resolve_binaries checked its major
            return
        result = subprocess.run(
            [
                self.binaries.initdb,
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",  # loopback-only development server
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.data_dir,
            **self._user_kwargs(),
        )
        if result.returncode != 0:
            raise DevStackError(
                f"initdb failed for {self.data_dir}:\n{result.stdout}{result.stderr}"
            )

    def _prepare_data_dir(self) -> None:
        """The data directory, 0700 and the server's user's; as root, in a directory of
        root's under the system temp dir (which an older layout gave to the server's user:
        taken back, so that it cannot swap the data directory for a link)."""
        if self.run_as is None:
            safe_dirs.ensure_dir(self.data_dir, 0o700)
            return
        server = safe_dirs.Owner.of(self.run_as)
        safe_dirs.ensure_dir(self.data_dir.parent, 0o755, previous_owners={server.uid})
        safe_dirs.ensure_dir(self.data_dir, 0o700, server)

    def _write_access_files(self) -> None:
        """pg_hba.conf, and the server's certificate and key (0600, owned by the server's
        user, as PostgreSQL demands of a key) in the data directory, on every start; written
        through the directory's descriptor, as :mod:`safe_dirs` says."""
        owner = None if self.run_as is None else safe_dirs.Owner.of(self.run_as)
        with safe_dirs.opened_dir(self.data_dir, 0o700, owner) as directory:
            for name, content, mode in (
                ("pg_hba.conf", PG_HBA.encode(), 0o600),
                ("server.crt", self.certificate.cert.read_bytes(), 0o644),
                ("server.key", self.certificate.key.read_bytes(), 0o600),
            ):
                safe_dirs.write_file(directory, name, content, mode, owner)

    def _remove_stale_lock(self) -> None:
        # A killed postmaster leaves postmaster.pid behind. PostgreSQL ignores it when that
        # pid is gone, but not when it is an unreaped zombie (a container whose PID 1 does
        # not reap orphans), and then refuses to start. A pid that runs nothing is no lock.
        lock = self.data_dir / "postmaster.pid"
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return
        if not is_alive(pid):
            lock.unlink(missing_ok=True)

    def _user_kwargs(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid}

    def wait_ready(self, port: int, timeout: float, secrets_dir: Path) -> None:
        """Wait until the server answers a query, then create the logins (their passwords in
        ``secrets_dir``) and the pipeline database, owned by the migrator."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile.live_pid() is None:
                raise DevStackError(
                    f"PostgreSQL exited during start-up; the end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            if asyncio.run(_ensure_logins_and_database(port, secrets_dir)):
                return
            time.sleep(0.1)
        raise DevStackError(
            f"PostgreSQL did not answer within {timeout:.0f}s; the end of {self.log_path}:\n"
            + log_tail(self.log_path)
        )


def data_dir(home: Path) -> Path:
    if os.geteuid() != 0:
        return home / "pgdata"
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"agent-pipeline-pg-{digest}" / "pgdata"


def pidfile(home: Path) -> PidFile:
    return PidFile(home / "postgres.pid", str(data_dir(home)))


def purge(home: Path) -> None:
    """Delete the cluster's data (the stack home itself is the caller's)."""
    target = data_dir(home)
    shutil.rmtree(target.parent if os.geteuid() == 0 else target, ignore_errors=True)


def dsn(port: int, database: str = DATABASE) -> str:
    """The superuser's URL: the stack's administration, and the tests'.

    ``sslmode=disable``: asyncpg's default (``prefer``) would encrypt every loopback
    connection the server offers TLS to, at about a third of the COPY throughput on two
    cores. TLS is asked for explicitly (:func:`with_tls`, `pipeline dev env --tls`), and the
    logins' URLs made from this one keep the setting.
    """
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}?sslmode=disable"


@dataclass(frozen=True)
class Login:
    """A login role and its password file, in the pgpass format (``*:*:*:user:password``),
    which the URL names with ``passfile=``: asyncpg, psql and pg_dump all read it, and the
    password is in no URL, environment variable or argv."""

    user: str
    passfile: Path

    def password(self) -> str:
        """The password in the file (a pooler in front of the server needs it)."""
        return self.passfile.read_text().strip().rsplit(":", 1)[1]

    def url(self, server_url: str) -> str:
        """``server_url`` (host, port, database, TLS settings) as this login."""
        parts = urlsplit(server_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        query = [
            pair
            for pair in parts.query.split("&")
            if pair and pair.split("=", 1)[0] not in ("passfile", "password", "user")
        ]
        query.append("passfile=" + quote(str(self.passfile), safe="/"))
        return urlunsplit(parts._replace(netloc=f"{self.user}@{host}", query="&".join(query)))


@dataclass(frozen=True)
class Logins:
    migrator: Login
    agent: Login
    analyst: Login


def passfile_name(user: str) -> str:
    """The name of the password file of the login ``user``, in a secrets directory."""
    return f"pg-{user}.pgpass"


def logins(secrets_dir: Path) -> Logins:
    """Where the logins' password files are (written by :func:`ensure_logins`)."""

    def login(user: str) -> Login:
        return Login(user, secrets_dir / passfile_name(user))

    return Logins(login(MIGRATOR), login(AGENT), login(ANALYST))


def with_tls(url: str, ca_file: Path) -> str:
    """``url`` verifying the server's certificate against ``ca_file``, and its host name."""
    parts = urlsplit(url)
    query = [
        pair
        for pair in parts.query.split("&")
        if pair and pair.split("=", 1)[0] not in ("sslmode", "sslrootcert")
    ]
    query += ["sslmode=verify-full", "sslrootcert=" + quote(str(ca_file), safe="/")]
    return urlunsplit(parts._replace(query="&".join(query)))


async def ensure_logins(conn: asyncpg.Connection, secrets_dir: Path) -> Logins:
    """The group roles (as 003_roles.sql makes them) and the three logins, on the server of
    ``conn`` (a superuser's, or a CREATEROLE one's). A login's password is made once and
    kept in its password file (0600); an existing login gets the file's password again."""
    found = logins(secrets_dir)
    for group in GROUP_OF.values():
        await conn.execute(
            f"""DO $$ BEGIN
                    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{group}') THEN
                        CREATE ROLE {group} NOLOGIN;
                    END IF;
                EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                END $$"""
        )
    for login in (found.migrator, found.agent, found.analyst):
        # The SCRAM verifier, not the password: a statement that fails is logged whole.
        verifier = scram_verifier(_password(login.passfile))
        attributes = f"LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{verifier}'"
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", login.user):
            await conn.execute(f"ALTER ROLE {login.user} {attributes}")
        else:
            await conn.execute(f"CREATE ROLE {login.user} {attributes}")
        if login.user in GROUP_OF:
            await conn.execute(f"GRANT {GROUP_OF[login.user]} TO {login.user}")
    return found


def scram_verifier(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """What PostgreSQL stores for ``password`` with scram-sha-256 (RFC 5802, RFC 7677):
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, base64. PostgreSQL takes
    it as it is in ``PASSWORD '...'`` (docs: CREATE ROLE), so the password itself never
    reaches the server, and no statement or server log holds it. The stack's passwords are
    ASCII letters, digits, ``-`` and ``_``, which SASLprep leaves as they are."""
    if not password.isascii() or not password.isprintable():
        raise ValueError("a SCRAM verifier is made here of printable ASCII passwords only")
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def _password(passfile: Path) -> str:
    """The password in ``passfile``; a new random one, written there, when it has none."""
    try:
        password = passfile.read_text().strip().rsplit(":", 1)[1]
    except (FileNotFoundError, IndexError):
        password = ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,}", password):  # also keeps it a safe SQL literal
        password = secrets.token_urlsafe(32)
        safe_dirs.ensure_dir(passfile.parent, 0o700)
        passfile.unlink(missing_ok=True)
        user = passfile.name.removeprefix("pg-").removesuffix(".pgpass")
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"*:*:*:{user}:{password}\n")
    return password


async def create_database(
    conn: asyncpg.Connection, url: str, database: str, owner: str | None
) -> None:
    """``CREATE DATABASE`` on the server of ``conn`` (a superuser's), at ``url``, owned by
    ``owner``, whose public schema ``owner`` owns too, as from PostgreSQL 15 on (where the
    database's owner owns it through pg_database_owner). Before 15 the bootstrap superuser
    owns it, so the migrator could not revoke PUBLIC's right to create tables there
    (sql/008_public_schema.sql does)."""
    await conn.execute(f'CREATE DATABASE "{database}"' + (f" OWNER {owner}" if owner else ""))
    if owner is None or conn.get_server_version().major >= 15:
        return
    new = await asyncpg.connect(url, timeout=10)
    try:
        await new.execute(f"ALTER SCHEMA public OWNER TO {owner}")
    finally:
        await new.close()


async def why_not_answering(url: str, probe_timeout: float = 3.0) -> str | None:
    """None when the server at ``url`` answers a query within ``probe_timeout`` seconds, else
    why not (the URL's password never appears: asyncpg does not quote it)."""
    try:
        async with asyncio.timeout(probe_timeout):
            conn = await asyncpg.connect(url, timeout=probe_timeout)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close(timeout=probe_timeout)
    except TimeoutError:
        return f"no answer within {probe_timeout:g}s"
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def _ensure_logins_and_database(port: int, secrets_dir: Path) -> bool:
    try:
        conn = await asyncpg.connect(dsn(port, "postgres"), timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False  # not listening yet, or still starting up or recovering
    try:
        await _logins_and_database(conn, dsn(port, DATABASE), secrets_dir)
        return True
    finally:
        await conn.close()


async def ensure_logins_and_database(
    admin_url: str, secrets_dir: Path, connect_timeout: float
) -> None:
    """The logins (:func:`ensure_logins`) and the pipeline database, owned by the migrator,
    on the server of ``admin_url`` (a superuser's, to a database other than the pipeline's):
    what `pipeline dev up` does on its own server, for one it did not start."""
    conn = await asyncpg.connect(admin_url, timeout=connect_timeout)
    try:
        url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{DATABASE}"))
        await _logins_and_database(conn, url, secrets_dir)
    finally:
        await conn.close()


async def _logins_and_database(conn: asyncpg.Connection, url: str, secrets_dir: Path) -> None:
    await ensure_logins(conn, secrets_dir)
    exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
    if not exists:
        await create_database(conn, url, DATABASE, MIGRATOR)


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise DevStackError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as. "
            "Create one (useradd --system postgres) or run this command as a normal user."
        ) from None
