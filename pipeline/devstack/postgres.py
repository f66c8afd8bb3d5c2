"""A PostgreSQL server from the machine's own binaries, tuned for bulk ingestion."""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from pipeline.devstack.processes import PidFile, is_alive, log_tail, spawn
from pipeline.errors import DevStackError

SUPERUSER = "pipeline"
DATABASE = "pipeline"
UNPRIVILEGED_USER = "postgres"

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


def find_binaries() -> Binaries:
    """Find the server binaries: ``PIPELINE_PG_BINDIR``, ``pg_config``, PATH, install dirs."""
    candidates: list[Path] = []
    if explicit := os.environ.get("PIPELINE_PG_BINDIR"):
        candidates.append(Path(explicit))
    elif pg_config := shutil.which("pg_config"):
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    if not os.environ.get("PIPELINE_PG_BINDIR"):
        if on_path := shutil.which("postgres"):
            candidates.append(Path(on_path).resolve().parent)
        for pattern in _SEARCH_GLOBS:
            candidates.extend(Path(p) for p in sorted(glob.glob(pattern), reverse=True))
    found = [c for c in candidates if (c / "postgres").is_file() and (c / "initdb").is_file()]
    if not found:
        where = os.environ.get("PIPELINE_PG_BINDIR") or "pg_config, PATH or " + ", ".join(
            _SEARCH_GLOBS
        )
        raise DevStackError(
            f"PostgreSQL server binaries (postgres, initdb) not found in {where}. Install "
            "the server (Debian: apt-get install postgresql; Fedora: dnf install "
            "postgresql-server; macOS: brew install postgresql@15), or set "
            "PIPELINE_PG_BINDIR to its bin directory."
        )
    bindir = found[0]
    version = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", version)
    if match is None:
        raise DevStackError(f"cannot read the version of {bindir / 'postgres'}: {version!r}")
    return Binaries(bindir, int(match.group(1)))


class PostgresServer:
    """One PostgreSQL cluster: ``initdb`` once, started on 127.0.0.1, stopped by its pid.

    PostgreSQL refuses to run as root. When this process is root, the server runs as the
    unprivileged ``postgres`` user, and its data directory lives where that user can reach
    it (under the system temp dir, named after ``home``), owned by it.
    """

    def __init__(self, home: Path, binaries: Binaries) -> None:
        self.home = home
        self.binaries = binaries
        self.run_as = _unprivileged_user() if os.geteuid() == 0 else None
        self.data_dir = data_dir(home)
        self.log_path = home / "postgres.log"
        self.pidfile = pidfile(home)

    def start(self, port: int) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        self._initdb_once()
        self._remove_stale_lock()
        args = [self.binaries.postgres, "-D", str(self.data_dir), "-p", str(port)]
        for name, value in SERVER_SETTINGS.items():
            args += ["-c", f"{name}={value}"]
        pid = spawn(args, self.log_path, cwd=self.data_dir, **self._user_kwargs())
        self.pidfile.write(pid)
        return pid

    def _initdb_once(self) -> None:
        version_file = self.data_dir / "PG_VERSION"
        if version_file.exists():
            found = version_file.read_text().strip()
            if found != str(self.binaries.major):
                raise DevStackError(
                    f"the data directory {self.data_dir} was created by PostgreSQL {found}, "
                    f"but this machine's server is PostgreSQL {self.binaries.major} "
                    f"({self.binaries.bindir}). Remove it with `pipeline dev down --purge` "
                    f"(its data is lost), or point PIPELINE_PG_BINDIR at PostgreSQL {found}."
                )
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            shutil.chown(self.data_dir.parent, self.run_as.pw_uid, self.run_as.pw_gid)
            shutil.chown(self.data_dir, self.run_as.pw_uid, self.run_as.pw_gid)
        self.data_dir.chmod(0o700)
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

    def wait_ready(self, port: int, timeout: float) -> None:
        """Wait until the server answers a query, then create the pipeline database."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile.live_pid() is None:
                raise DevStackError(
                    f"PostgreSQL exited during start-up; the end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            if asyncio.run(_ensure_database(port)):
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
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{database}"


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


async def _ensure_database(port: int) -> bool:
    try:
        conn = await asyncpg.connect(dsn(port, "postgres"), timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False  # not listening yet, or still starting up or recovering
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        return True
    finally:
        await conn.close()


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise DevStackError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as. "
            "Create one (useradd --system postgres) or run this command as a normal user."
        ) from None
