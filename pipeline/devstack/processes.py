"""Processes the local stack starts: pid files, liveness, ports, and stopping by process id."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PidFile:
    """A pid file plus the command-line marker that proves the pid is still ours.

    A pid alone is not enough after a crash: the number may have been reused by an
    unrelated process, so liveness also checks that the process's command line holds
    ``marker`` (the data directory or main class we started it with).
    """

    path: Path
    marker: str

    def read(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def write(self, pid: int) -> None:
        self.path.write_text(f"{pid}\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def live_pid(self) -> int | None:
        """The pid if that process is alive and is the one we started, else None."""
        pid = self.read()
        if pid is None or not is_alive(pid):
            return None
        if pid in _spawned:
            # Our own child: between fork and exec its command line is still ours, so the
            # marker cannot prove anything yet; the handle does.
            return pid if _spawned[pid].poll() is None else None
        cmdline = _cmdline(pid)
        if cmdline is not None and self.marker not in cmdline:
            return None
        return pid


# Servers outlive the call that started them; their Popen handles stay here so that the
# handle is not garbage-collected (with a warning) while the server runs, and so that a
# stop from this same process reaps its child.
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def spawn(args: Sequence[str], log_path: Path, **popen_kwargs: Any) -> int:
    """Start a server in its own session with its output appended to ``log_path``, which
    only this user may read: a server logs a failed statement with its text."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # one made before the stack said so
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen_kwargs,
        )
    _spawned[proc.pid] = proc
    return proc.pid


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None  # no /proc (macOS): fall back to the pid alone


def stop_pid(pid: int, sig: signal.Signals, timeout: float) -> bool:
    """Send ``sig`` to ``pid`` and wait for it to exit; SIGKILL after ``timeout``.

    Returns True when the process exited on the first signal.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if wait_exit(pid, timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_exit(pid, 10.0)
    return False


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return not is_alive(pid)


def _reap(pid: int) -> None:
    # When this process is the parent, collect the exit status so the child does not
    # linger as a zombie.
    if (proc := _spawned.get(pid)) is not None and proc.poll() is not None:
        del _spawned[pid]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections of a stopped server lingering in TIME_WAIT do not
        # make a port taken, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def choose_port(preferred: int, taken: Collection[int] = (), host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free, else (or when it is 0) a free port the kernel picks."""
    if preferred and preferred not in taken and port_is_free(preferred, host):
        return preferred
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail) or "    (log is empty)"
