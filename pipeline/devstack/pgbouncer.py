"""PgBouncer from the machine's own package, on 127.0.0.1 in front of a PostgreSQL server, in
transaction or session mode: what managed PostgreSQL's pooled URLs are (Neon's -pooler host,
Supabase's port 6543), for the tests and `pipeline bench --pooler` (docs/compatibility.md).

It knows the pipeline's logins (docs/security.md) and nothing else: its userlist holds their
passwords (a 0600 file of its own; never argv), and every database of the server is reachable
through it (a wildcard entry), scratch databases included. It does not ignore any startup
parameter a client sends: whatever it refuses, the pipeline must not send.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from pipeline.devstack import safe_dirs
from pipeline.devstack.postgres import UNPRIVILEGED_USER, Login
from pipeline.devstack.processes import PidFile, choose_port, log_tail, spawn, stop_pid
from pipeline.errors import DevStackError

MODES = ("transaction", "session")
INSTALL = "install pgbouncer (Debian: apt-get install pgbouncer)"
# Distributions put it in sbin, which is not on a normal user's PATH.
_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin")
READY_TIMEOUT = 30.0


def find_binary() -> str:
    """The ``pgbouncer`` executable: on PATH, or where distributions install it."""
    found = shutil.which("pgbouncer")
    if found is None:
        found = next(
            (str(Path(d) / "pgbouncer") for d in _SEARCH_DIRS if (Path(d) / "pgbouncer").is_file()),
            None,
        )
    if found is None:
        raise DevStackError(
            f"pgbouncer not found on PATH or in {', '.join(_SEARCH_DIRS)}: {INSTALL}"
        )
    return found


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise DevStackError(f"PgBouncer's pool mode must be one of {', '.join(MODES)}: {mode!r}")


def agent_settings(mode: str) -> dict[str, str]:
    """What a DatabaseAgent behind a PgBouncer in ``mode`` is told (as ``PIPELINE_<NAME>``
    settings): behind a transaction pooler, no prepared statement cache."""
    return {"db_pooler": "transaction"} if mode == "transaction" else {}


def config_text(
    *, mode: str, port: int, server_host: str, server_port: int, auth_file: Path
) -> str:
    """pgbouncer.ini: 127.0.0.1 only, no unix socket, SCRAM from the clients and to the
    server, every database of the server; pools sized for a test suite (a pool is per
    database and login: a scratch database's agents share one)."""
    check_mode(mode)
    return f"""# Written by pipeline.devstack.pgbouncer on every start.
[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = {mode}
auth_type = scram-sha-256
auth_file = {auth_file}
default_pool_size = 20
max_client_conn = 500
server_tls_sslmode = disable
log_connections = 0
log_disconnections = 0
"""


def userlist_text(logins: Iterable[Login]) -> str:
    """userlist.txt: each login and its password (PgBouncer needs it in plain text, or as a
    SCRAM secret, to log in to the server as that login)."""
    return "".join(f'"{login.user}" "{login.password()}"\n' for login in logins)


def through(url: str, port: int) -> str:
    """``url`` (its login, database and settings) connecting to a PgBouncer on 127.0.0.1:port."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


class PgBouncer:
    """One PgBouncer: its config and userlist written on every start, started and stopped
    by its pid.

    PgBouncer refuses to run as root. When this process is root, it runs as the unprivileged
    ``postgres`` user, and its files live where that user can read them: under the system
    temp dir, named after ``home``, in a directory of root's (made and checked as
    :mod:`pipeline.devstack.safe_dirs` says), each file 0600 and that user's.
    """

    def __init__(self, home: Path, mode: str) -> None:
        check_mode(mode)
        self.home = home
        self.mode = mode
        self.run_as = _unprivileged_user() if os.geteuid() == 0 else None
        self.config_dir = config_dir(home)
        self.log_path = home / "pgbouncer.log"
        self.pidfile = pidfile(home)
        self.port: int | None = None

    def start(
        self, server_host: str, server_port: int, logins: Iterable[Login], port: int = 0
    ) -> int:
        """Start in front of the server at ``server_host:server_port``; returns the pid.
        ``port`` 0 (or taken) means a free one, in :attr:`port` afterwards."""
        binary = find_binary()
        if self.pidfile.live_pid() is not None:
            raise DevStackError(f"a PgBouncer of {self.home} is running already")
        safe_dirs.ensure_dir(self.home, 0o700)
        self.port = choose_port(port, {server_port})
        auth_file = self.config_dir / "userlist.txt"
        ini = self.config_dir / "pgbouncer.ini"
        config = config_text(
            mode=self.mode,
            port=self.port,
            server_host=server_host,
            server_port=server_port,
            auth_file=auth_file,
        )
        # Root's directory (the server's user cannot swap it for a link), its files the
        # server's user's, to read; see safe_dirs.
        owner = None if self.run_as is None else safe_dirs.Owner.of(self.run_as)
        earlier = set() if owner is None else {owner.uid}  # its owner before this layout
        with safe_dirs.opened_dir(self.config_dir, 0o755, previous_owners=earlier) as directory:
            for path, text in ((auth_file, userlist_text(logins)), (ini, config)):
                safe_dirs.write_file(directory, path.name, text.encode(), 0o600, owner)
        pid = spawn([binary, str(ini)], self.log_path, cwd=self.config_dir, **self._user_kwargs())
        self.pidfile.write(pid)
        return pid

    def wait_ready(self, login: Login, database: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until a query as ``login`` on ``database`` goes through (to the server)."""
        assert self.port is not None, "start() first"
        url = login.url(f"postgresql://127.0.0.1:{self.port}/{database}?sslmode=disable")
        deadline = time.monotonic() + timeout
        problem = "not asked yet"
        while time.monotonic() < deadline:
            if self.pidfile.live_pid() is None:
                raise DevStackError(
                    f"PgBouncer exited during start-up; the end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            found = asyncio.run(_why_not_answering(url))
            if found is None:
                return
            problem = found
            time.sleep(0.1)
        raise DevStackError(
            f"PgBouncer did not answer within {timeout:.0f}s ({problem}); the end of "
            f"{self.log_path}:\n" + log_tail(self.log_path)
        )

    def stop(self) -> None:
        """Stop it (SIGINT: a safe shutdown, clients' transactions end) and remove its files."""
        pid = self.pidfile.live_pid()
        if pid is not None:
            stop_pid(pid, signal.SIGINT, timeout=30.0)
        self.pidfile.remove()
        shutil.rmtree(self.config_dir, ignore_errors=True)

    def url(self, server_url: str) -> str:
        """``server_url`` through this PgBouncer."""
        assert self.port is not None, "start() first"
        return through(server_url, self.port)

    def _user_kwargs(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid}


@contextmanager
def running(
    home: Path, mode: str, server_url: str, logins: Iterable[Login], database: str
) -> Iterator[PgBouncer]:
    """A PgBouncer in ``mode`` in front of the server of ``server_url``, answering as the
    first of ``logins`` on ``database``; stopped afterwards."""
    parts = urlsplit(server_url)
    found = list(logins)
    bouncer = PgBouncer(home, mode)
    try:
        bouncer.start(parts.hostname or "127.0.0.1", parts.port or 5432, found)
        bouncer.wait_ready(found[0], database)
        yield bouncer
    finally:
        bouncer.stop()


def config_dir(home: Path) -> Path:
    if os.geteuid() != 0:
        return home / "pgbouncer"
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"agent-pipeline-pgbouncer-{digest}"


def pidfile(home: Path) -> PidFile:
    return PidFile(home / "pgbouncer.pid", str(config_dir(home)))


async def _why_not_answering(url: str) -> str | None:
    """None when a query goes through; else why not. A simple query and no statement
    cache: a prepared statement would stay on the server connection the pool hands the next
    client (in transaction mode), and break it."""
    try:
        async with asyncio.timeout(3.0):
            conn = await asyncpg.connect(url, timeout=3.0, statement_cache_size=0)
            try:
                await conn.execute("SELECT 1")
            finally:
                await conn.close(timeout=3.0)
    except TimeoutError:
        return "no answer within 3s"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise DevStackError(
            "PgBouncer refuses to run as root and there is no 'postgres' user to run it as. "
            "Create one (useradd --system postgres) or run this command as a normal user."
        ) from None
