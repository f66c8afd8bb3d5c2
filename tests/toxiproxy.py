"""Toxiproxy (Shopify's TCP fault proxy) for the tests: the server built once per machine, run
by its pid, and driven over its HTTP API. docs/testing.md, "Network faults: Toxiproxy", says
how the tests use it.

:func:`install` builds ``toxiproxy-server`` with ``go install`` into the project's cache (as
the Kafka jars are resolved once, :func:`pipeline.devstack.kafka.resolve_jars`); a build that
fails raises :class:`ToxiproxyError`, which fails the tests that need it: never a skip.
:class:`Toxiproxy` is one server (``with Toxiproxy(home) as server``); :meth:`Toxiproxy.proxy`
puts a :class:`Proxy` in front of an upstream, and a proxy's toxics are added and removed
by name (:meth:`Proxy.add`, :meth:`Proxy.remove`, :meth:`Proxy.toxic` for a block).
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pipeline.devstack.processes import PidFile, choose_port, log_tail, spawn, stop_pid
from pipeline.devstack.stack import cache_root

VERSION = "2.5.0"
MODULE = "github.com/Shopify/toxiproxy/v2/cmd/server"
# Where Go is when it is not on PATH: the official tarball's place.
_GO_FALLBACK = Path("/usr/local/go/bin/go")
_BUILD_TIMEOUT_S = 600

Stream = Literal["upstream", "downstream"]  # client to server, server to client


class ToxiproxyError(Exception):
    """Toxiproxy could not be built, started or driven."""


def install(cache_dir: Path | None = None) -> Path:
    """The ``toxiproxy-server`` binary of :data:`VERSION`, built with ``go install`` into
    ``cache_dir`` (default: the project's cache, :func:`pipeline.devstack.stack.cache_root`)
    the first time, and reused after that. Processes building at once take turns."""
    home = (cache_dir or cache_root()) / f"toxiproxy-{VERSION}"
    binary = home / "toxiproxy-server"
    if binary.exists():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # another process built it while this one waited
            return binary
        go = shutil.which("go") or (str(_GO_FALLBACK) if _GO_FALLBACK.exists() else None)
        if go is None:
            raise ToxiproxyError(
                "Go is not on PATH; the network fault tests build toxiproxy-server with "
                f"`go install {MODULE}@v{VERSION}`. Install Go 1.17 or newer."
            )
        with tempfile.TemporaryDirectory(dir=home) as gobin:
            try:
                result = subprocess.run(
                    [go, "install", f"{MODULE}@v{VERSION}"],
                    env={**os.environ, "GOBIN": gobin},
                    capture_output=True,
                    text=True,
                    timeout=_BUILD_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise ToxiproxyError(
                    f"`go install {MODULE}@v{VERSION}` did not finish within {_BUILD_TIMEOUT_S}s"
                ) from None
            built = Path(gobin) / "server"
            if result.returncode != 0 or not built.exists():
                said = (result.stdout + result.stderr).strip().splitlines()[-15:]
                raise ToxiproxyError(
                    f"`go install {MODULE}@v{VERSION}` failed (exit {result.returncode}); is "
                    "the Go module proxy reachable (GOPROXY)? Go said:\n" + "\n".join(said)
                )
            built.rename(binary)  # in one step: a binary that exists is whole
    return binary


class Toxiproxy:
    """One toxiproxy-server, its API on 127.0.0.1, its pid file and log under ``home``.
    ``start()`` and ``stop()`` (by its pid), or ``with Toxiproxy(home) as server``."""

    def __init__(self, home: Path, binary: Path | None = None) -> None:
        self.home = home
        self._binary = binary
        self.log_path = home / "toxiproxy.log"
        self.pidfile = PidFile(home / "toxiproxy.pid", "toxiproxy-server")
        self.port: int | None = None

    @property
    def api(self) -> str:
        assert self.port is not None, "the server is not started"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Toxiproxy:
        binary = self._binary or install()
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = choose_port(0)
        pid = spawn(
            [str(binary), "-host", "127.0.0.1", "-port", str(self.port)],
            self.log_path,
            env={**os.environ, "LOG_LEVEL": "warn"},
        )
        self.pidfile.write(pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile.live_pid() is None:
                raise ToxiproxyError(
                    f"toxiproxy-server exited during start-up; the end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            with contextlib.suppress(OSError):
                self.request("GET", "/version")
                return self
            time.sleep(0.05)
        self.stop()
        raise ToxiproxyError(f"toxiproxy-server did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        pid = self.pidfile.live_pid()
        if pid is not None:
            stop_pid(pid, signal.SIGTERM, 5.0)
        self.pidfile.remove()

    def __enter__(self) -> Toxiproxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def request(self, method: str, path: str, body: object = None) -> Any:
        """One API call; its JSON answer (None when it has none). An error status raises
        :class:`ToxiproxyError` with the server's message."""
        return request(self.api, method, path, body)

    def proxy(self, name: str, upstream: str, listen: str = "127.0.0.1:0") -> Proxy:
        """A new proxy ``name`` from ``listen`` (default: a free port the server picks) to
        ``upstream`` (HOST:PORT); replaces one of that name."""
        with contextlib.suppress(ToxiproxyError):
            self.request("DELETE", f"/proxies/{name}")
        created = self.request(
            "POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream}
        )
        return Proxy(self.api, name, created["listen"], upstream)

    def reset(self) -> None:
        """Every proxy enabled again and every toxic removed."""
        self.request("POST", "/reset")


@dataclass(frozen=True)
class Proxy:
    """One proxy of a server whose API is at ``api``; clients connect to ``listen``."""

    api: str
    name: str
    listen: str  # HOST:PORT
    upstream: str  # HOST:PORT

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def add(
        self,
        kind: str,
        stream: Stream = "downstream",
        *,
        name: str | None = None,
        toxicity: float = 1.0,
        **attributes: int,
    ) -> str:
        """Add a toxic of type ``kind`` (``latency``, ``timeout``, ``limit_data``,
        ``reset_peer``, ...) with its ``attributes`` on one direction; returns its name
        (default ``<kind>_<stream>``), which :meth:`remove` takes. It acts on the proxy's
        connections open now and on those opened while it is there."""
        toxic = {
            "name": name or f"{kind}_{stream}",
            "type": kind,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": attributes,
        }
        added = request(self.api, "POST", f"/proxies/{self.name}/toxics", toxic)
        return str(added["name"])

    def remove(self, name: str) -> None:
        """Remove the toxic ``name``. Removing a ``timeout`` toxic closes the connections it
        held (Toxiproxy's behaviour)."""
        request(self.api, "DELETE", f"/proxies/{self.name}/toxics/{name}")

    @contextlib.contextmanager
    def toxic(
        self,
        kind: str,
        stream: Stream = "downstream",
        *,
        name: str | None = None,
        toxicity: float = 1.0,
        **attributes: int,
    ) -> Iterator[str]:
        """:meth:`add` for the block, :meth:`remove` after it, however it ends."""
        added = self.add(kind, stream, name=name, toxicity=toxicity, **attributes)
        try:
            yield added
        finally:
            self.remove(added)

    def toxics(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = request(self.api, "GET", f"/proxies/{self.name}/toxics")
        return found

    def enable(self) -> None:
        request(self.api, "POST", f"/proxies/{self.name}", {"enabled": True})

    def disable(self) -> None:
        """Stop listening and close every connection of the proxy, until :meth:`enable`."""
        request(self.api, "POST", f"/proxies/{self.name}", {"enabled": False})

    def delete(self) -> None:
        request(self.api, "DELETE", f"/proxies/{self.name}")


def request(api: str, method: str, path: str, body: object = None, timeout: float = 10.0) -> Any:
    """One call to the API at ``api`` (``http://127.0.0.1:PORT``): its JSON answer (text for
    the one call that answers text, ``/version``), or None."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        api + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            text = response.read()
            is_json = response.headers.get_content_type() == "application/json"
    except urllib.error.HTTPError as exc:
        raise ToxiproxyError(
            f"toxiproxy {method} {path}: {exc.code} {exc.read().decode(errors='replace')}"
        ) from None
    if not text.strip():
        return None
    return json.loads(text) if is_json else text.decode()
