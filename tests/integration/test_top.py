"""`pipeline top` against two real DatabaseAgents: on a real terminal (tmux, the screen read
back with `capture-pane`), and as plain tables when its output is not a terminal.

The lag is made exact: the agents' table is locked, so the records produced wait, fetched but
not written, and each instance's lag is the count produced to the partitions it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from consumers.antigravity import Antigravity
from consumers.top import scrape
from pipeline.devstack.processes import choose_port
from pipeline.kafka_clients import KafkaSettings
from pipeline.metrics import Metrics
from pipeline.testbed import AgentProcess, stop_agents
from pipeline.top import Scrape
from tests.conftest import Servers
from tests.integration.harness import (
    agent_env,
    create_topics,
    fleet_traffic,
    migrated,
    produce,
    produce_paced,
    until,
)

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
TOP = (sys.executable, "-m", "pipeline.cli", "top")
WIDTH, HEIGHT = 160, 40
HEADER = re.compile(r"^pipeline top \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: ", re.MULTILINE)


def tmux_binary() -> str:
    found = shutil.which("tmux")
    if found is None:
        pytest.fail("tmux is not installed; the terminal test needs it: apt-get install tmux")
    return found


class Terminal:
    """A tmux server of this test's own (its own socket), one session running a command."""

    def __init__(self, directory: Path) -> None:
        self.tmux = tmux_binary()
        self.directory = directory
        self.socket = directory / "tmux.sock"

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [self.tmux, "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def start(self, name: str, env: dict[str, str], command: list[str]) -> Path:
        """Run ``command`` in a WIDTHxHEIGHT terminal; returns the file its exit code lands in
        (its stderr goes to NAME.err)."""
        rc = self.directory / f"{name}.rc"
        script = self.directory / f"{name}.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
        script.write_text(
            # The shell outlives a Ctrl-C meant for the command, to write down its exit code.
            f"{exports}trap : INT\ncd {shlex.quote(str(ROOT))}\n"
            f"{shlex.join(command)} 2>{shlex.quote(str(self.directory / f'{name}.err'))}\n"
            f"echo $? > {shlex.quote(str(rc))}\n"
        )
        script.chmod(0o700)
        self._run(
            "-f", "/dev/null", "new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT),
            "-s", name, f"sh {shlex.quote(str(script))}",
        )  # fmt: skip
        return rc

    def screen(self, name: str) -> str:
        return self._run("capture-pane", "-p", "-t", name)

    def keys(self, name: str, *keys: str) -> None:
        self._run("send-keys", "-t", name, *keys)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("kill-server")


@contextlib.contextmanager
def terminal() -> Iterator[Terminal]:
    # A short directory: a unix socket's path must fit in 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="top-"))
    term = Terminal(directory)
    try:
        yield term
    finally:
        term.close()
        shutil.rmtree(directory, ignore_errors=True)


def instance_rows(screen: str, ids: list[str]) -> dict[str, list[str]]:
    """The table's line of each instance, split into columns: INSTANCE STATE STREAMS PARTS
    ROWS/S LAG LAG-S HEARD [LAST ERROR...]."""
    found = {}
    for line in screen.splitlines():
        columns = line.split()
        if columns and columns[0] in ids:
            found[columns[0]] = columns
    return found


def lag_seconds_shown(column: str) -> bool:
    """'-' while agents do not export pipeline_consumer_lag_seconds; else a number."""
    return column == "-" or float(column.replace(",", "")) >= 0


def rc_of(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else None


def top_env(bootstrap: str, database_url: str, prefix: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": database_url,
        "PIPELINE_TOPIC_PREFIX": prefix,
    }


async def test_top_shows_each_agent_its_lag_and_who_went_away(
    servers: Servers, database_url: str, unique: str, tmp_path: Path
) -> None:
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    group = prefix
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    ids = [f"{unique}-a", f"{unique}-b"]
    addresses = {i: f"127.0.0.1:{choose_port(0)}" for i in ids}
    agents = {
        i: AgentProcess(
            agent_env(
                bootstrap,
                database_url,
                prefix,
                group,
                instance_id=i,
                metrics_address=addresses[i],
                db_command_timeout_s=600,  # the lock below must not turn into retries
                db_idle_in_transaction_timeout_s=900,  # must be above the command timeout
            ),
            tmp_path / f"{i}.log",
        ).start()
        for i in ids
    }
    ag = Antigravity(KafkaSettings(bootstrap_servers=bootstrap), prefix=prefix)
    env = top_env(bootstrap, database_url, prefix)
    try:
        # 1. Both agents running, the 15 partitions split between them, and each heartbeat
        #    saying where its /metrics are.
        owned: dict[str, set[tuple[str, int]]] = {}

        async def split() -> bool:
            beats = {h.instance_id: h for h in await ag.fleet(group) if h.state == "running"}
            owned.clear()
            owned.update({i: set(h.owned_partitions) for i, h in beats.items()})
            return (
                set(beats) == set(ids)
                and all(owned.values())
                and sum(len(p) for p in owned.values()) == 15
                and all(beats[i].metrics_address == addresses[i] for i in ids)
            )

        await until(split, within=120, what="two running agents sharing 15 partitions")

        # 2. The metrics table locked: what is produced now waits, fetched and unwritten.
        lock = await asyncpg.connect(database_url, timeout=10)
        try:
            async with lock.transaction():
                await lock.execute("LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE")
                metrics = [o for o in fleet_traffic(4_000, seed=12) if o.stream.name == "metrics"]
                sent = await produce(bootstrap, prefix, metrics)
                per_partition = Counter((prefix + s.topic, s.partition) for s in sent)
                expected = {i: sum(per_partition[p] for p in owned[i]) for i in ids}
                assert sum(expected.values()) == len(metrics)
                await _locked_screens(env, group, ids, owned, expected)
        finally:
            await lock.close()

        # 3. Unlocked, with more records arriving: rows are written (a rate), the lag ends at 0.
        await _drain_screen(env, group, ids, bootstrap, prefix)

        # 4. One agent killed (no last word), the other stopped: gone? and stopped.
        with terminal() as term:
            rc = term.start("top", env, [*TOP, "--group", group])
            agents[ids[0]].kill()

            def gone() -> bool:
                rows = instance_rows(term.screen("top"), ids)
                return rows.get(ids[0], [""])[1:2] == ["gone?"]

            await until(_sync(gone), within=60, what=f"{ids[0]} shown as gone?")
            agents[ids[1]].stop()

            def stopped() -> bool:
                rows = instance_rows(term.screen("top"), ids)
                return [rows.get(i, ["", ""])[1] for i in ids] == ["gone?", "stopped"]

            await until(_sync(stopped), within=60, what=f"{ids[1]} shown as stopped")
            print(f"\n--- pipeline top after a kill -9 and a SIGTERM ---\n{term.screen('top')}")
            term.keys("top", "C-c")  # Ctrl-C quits as cleanly as q
            await until(_sync(lambda: rc_of(rc) is not None), within=30, what="top to quit")
            assert rc_of(rc) == 0, (term.directory / "top.err").read_text()
    finally:
        await stop_agents(list(agents.values()))


async def _locked_screens(
    env: dict[str, str],
    group: str,
    ids: list[str],
    owned: dict[str, set[tuple[str, int]]],
    expected: dict[str, int],
) -> None:
    """While the lag holds still: the terminal view, --once, and plain tables per refresh."""

    def shows_the_lag(screen: str) -> bool:
        rows = instance_rows(screen, ids)
        return (
            set(rows) == set(ids)
            and all(rows[i][1] == "running" for i in ids)
            and all(rows[i][3] == str(len(owned[i])) for i in ids)
            and all(rows[i][4] == "0" for i in ids)  # rows/s: nothing written while locked
            and all(rows[i][5] == f"{expected[i]:,}" for i in ids)
            and all(lag_seconds_shown(rows[i][6]) for i in ids)
            and f"lag {sum(expected.values()):,} records" in screen
        )

    # The terminal: full screen, refreshed in place; q quits and gives the terminal back.
    with terminal() as term:
        started = time.monotonic()
        rc = term.start("top", env, [*TOP, "--group", group, "--interval", "1"])
        screen = ""

        def lag_on_screen() -> bool:
            nonlocal screen
            screen = term.screen("top")
            return shows_the_lag(screen)

        try:
            await until(_sync(lag_on_screen), within=60, what="both agents and their lag on screen")
        except AssertionError:
            print(f"last screen:\n{screen}\nstderr: {(term.directory / 'top.err').read_text()}")
            raise
        took = time.monotonic() - started
        print(f"\n--- pipeline top in a {WIDTH}x{HEIGHT} terminal ({took:.1f}s to this) ---")
        print(screen)
        header = screen.splitlines()[0]
        assert header.startswith("pipeline top 20")
        # The terminal's width, whatever LINES and COLUMNS say: the header is whole.
        assert header.endswith(f" UTC: group {group}, 2 instance(s) (2 running), every 1s")
        assert "LAST ERROR" in screen
        assert screen.rstrip().splitlines()[-1] == "q: quit"
        term.keys("top", "q")
        await until(_sync(lambda: rc_of(rc) is not None), within=30, what="top to quit on q")
        assert rc_of(rc) == 0, (term.directory / "top.err").read_text()

    # --once, its output a pipe: one table, two scrapes apart.
    once = await asyncio.to_thread(
        subprocess.run,
        [*TOP, "--group", group, "--once"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert once.returncode == 0, once.stderr
    print(f"--- pipeline top --once ---\n{once.stdout}")
    assert shows_the_lag(once.stdout)
    assert len(HEADER.findall(once.stdout)) == 1

    # Not a terminal, no --once: a table per refresh, until SIGINT.
    plain = await asyncio.create_subprocess_exec(
        *TOP,
        "--group",
        group,
        "--interval",
        "0.5",
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert plain.stdout is not None
        out = ""
        while len(HEADER.findall(out)) < 3:  # then the second table is whole
            line = (await asyncio.wait_for(plain.stdout.readline(), 60)).decode()
            assert line, f"top ended early with {await plain.wait()}"
            out += line
        plain.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(plain.communicate(), 30)
        assert plain.returncode == 0, err.decode()
    finally:
        if plain.returncode is None:
            plain.kill()
            await plain.wait()
    out += rest.decode()
    headers = list(HEADER.finditer(out))
    tables = [out[m.start() : n.start()] for m, n in itertools.pairwise(headers)]  # whole ones
    assert len(tables) >= 2
    assert all(f": group {group}, 2 instance(s) (2 running)" in t for t in tables)
    assert all(t.endswith("\n\n") for t in tables)  # a blank line after each table
    assert shows_the_lag(tables[1])

    # Its reader gone (`pipeline top | head -1`): it ends quietly, with no traceback.
    read_end, write_end = os.pipe()
    piped = await asyncio.create_subprocess_exec(
        *TOP,
        "--group",
        group,
        "--interval",
        "0.2",
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = await asyncio.wait_for(asyncio.to_thread(reader.readline), 60)
    assert HEADER.match(first.decode())
    _, err = await asyncio.wait_for(piped.communicate(), 30)
    assert (piped.returncode, err.decode()) == (0, "")


async def test_scrape_reads_an_agents_metrics_or_says_why_not() -> None:
    metrics = Metrics()
    metrics.rows_ingested.labels("performance_metrics", "live").inc(42)
    metrics.lag.labels("agents.metrics", "0").set(7)
    address = f"127.0.0.1:{choose_port(0)}"
    metrics.serve(address)
    try:
        found = await scrape(address)
        assert isinstance(found, Scrape)
        assert (found.rows_ingested, found.lag_records, found.lag_seconds) == (42, 7, None)
    finally:
        metrics.close()
    assert await scrape(address) == "connection refused"
    # A port that accepts connections and never answers: the scrape gives up in time.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        assert await scrape(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5) == "timed out"
        assert time.monotonic() - started < 5, "the timeout bounds a scrape"


async def _drain_screen(
    env: dict[str, str], group: str, ids: list[str], bootstrap: str, prefix: str
) -> None:
    """Records arriving after the lock: a rate shows, and the lag ends at 0 everywhere."""
    with terminal() as term:
        rc = term.start("top", env, [*TOP, "--group", group])
        metrics = [o for o in fleet_traffic(6_000, seed=13) if o.stream.name == "metrics"]
        sending = asyncio.create_task(produce_paced(bootstrap, prefix, metrics, over=8.0))
        rates: list[int] = []

        def writing() -> bool:
            rows = instance_rows(term.screen("top"), ids)
            rates.extend(int(r[4].replace(",", "")) for r in rows.values() if r[4] != "-")
            return any(rate > 0 for rate in rates)

        await until(_sync(writing), within=60, what="a rows/s above 0 on screen")
        await sending
        screen = ""

        def caught_up() -> bool:
            nonlocal screen
            screen = term.screen("top")
            rows = instance_rows(screen, ids)
            return set(rows) == set(ids) and all(rows[i][5] == "0" for i in ids)

        await until(_sync(caught_up), within=90, what="lag 0 on screen for both")
        print(f"--- while writing: rows/s seen {sorted(set(rates))[-5:]} ---\n{screen}")
        term.keys("top", "q")
        await until(_sync(lambda: rc_of(rc) is not None), within=30, what="top to quit on q")
        assert rc_of(rc) == 0


def _sync(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """An ``until`` condition from a blocking function (it runs tmux)."""

    async def condition() -> bool:
        return await asyncio.to_thread(check)

    return condition
