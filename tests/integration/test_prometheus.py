"""The monitoring as an operator gets it: a real Prometheus (the machine's binary, as
`pipeline dev up --prometheus` starts it) scraping real DatabaseAgent processes on real Kafka
and PostgreSQL. Every query of the Grafana dashboard (deploy/grafana/dashboards/pipeline.json)
parses and returns data, and a SIGKILLed agent raises PipelineAgentDown.

Prometheus is not mocked and not skipped: without the binary these tests fail, naming
`apt-get install prometheus`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumers.antigravity import Antigravity
from pipeline import db, partition_maint, testbed
from pipeline.catalog import load as load_catalog
from pipeline.control import Activate, generate_key_pair, write_public_key_file
from pipeline.db_session import Session
from pipeline.devstack.processes import choose_port, is_alive, log_tail
from pipeline.devstack.prometheus import JOB, RULES_DIR, LocalPrometheus
from pipeline.kafka_clients import KafkaSettings
from pipeline.testbed import AgentProcess
from tests.builtin_streams import STREAM_BY_NAME
from tests.conftest import Servers
from tests.integration.harness import (
    T0,
    Outgoing,
    agent_env,
    create_topics,
    fleet_traffic,
    migrated,
    produce,
    until,
)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pipeline.json"
PIPELINE = (sys.executable, "-m", "pipeline.cli")  # this checkout's, from cwd=ROOT
# What Grafana puts in place of the dashboard's variables: every instance (the variable's
# "All" value), and a rate window of many scrapes at this test's 1 s scrape interval.
VARIABLES = {"$__rate_interval": "30s", "${instance}": ".*", "$instance": ".*"}
SHORT_FOR = "1s"


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus is not installed (not on PATH): apt-get install prometheus")
    return found


async def partitions_made(database_url: str) -> None:
    """Maintenance passes, as `pipeline migrate` ends with one: partitions for today and those
    ahead, and for the fleet traffic's day (harness.T0), so no partition alert fires (no row
    in DEFAULT) and every partition panel has data."""
    conn = await db.connect(testbed.as_migrator(database_url), Session(command_timeout=60))
    try:
        tables = partition_maint.targets(load_catalog())
        for now in (T0, datetime.datetime.now(datetime.UTC)):
            await partition_maint.maintain(conn, tables, now, print)
    finally:
        await conn.close()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable this test does not know"
            queries.append((panel["title"], expr))
    return queries


def shortened_rules(directory: Path) -> Path:
    """A copy of the alert rules with every ``for:`` set to 1 s, so that the alerts fire within
    the test's time; the expressions, labels and annotations are the real file's, unchanged."""
    text = (RULES_DIR / "pipeline.rules.yml").read_text()
    short, count = re.subn(r"^( +for: )\S+$", rf"\g<1>{SHORT_FOR}", text, flags=re.MULTILINE)
    assert count >= 10, "the rules' for: durations"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.rules.yml"
    path.write_text(short)
    return path


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=10) as response:
        return json.loads(response.read())


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result; a query Prometheus cannot parse fails here."""
    try:
        answer = api(url, "/api/v1/query", query=expr)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr}: {exc.code} {exc.read().decode()}") from exc
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def firing(url: str, alertname: str) -> list[dict[str, str]]:
    return [labels for labels in all_firing(url) if labels["alertname"] == alertname]


def all_firing(url: str) -> list[dict[str, str]]:
    """The labels of every firing alert."""
    alerts = api(url, "/api/v1/alerts")["data"]["alerts"]
    return [a["labels"] for a in alerts if a["state"] == "firing"]


async def terminate_backends(database_url: str, database: str) -> int:
    """End every other session on ``database``: the agents' next command fails and is retried
    on a new connection (a transient failure, pipeline_retries_total)."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        ended: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return ended
    finally:
        await conn.close()


async def produce_until(stopped: asyncio.Event, bootstrap: str, prefix: str) -> int:
    """Fleet traffic, a chunk every half second, until ``stopped``; how many records."""
    sent = 0
    seed = 1000
    while not stopped.is_set():
        sent += len(await produce(bootstrap, prefix, fleet_traffic(1000, seed=seed)))
        seed += 1
        await asyncio.sleep(0.5)
    return sent


async def test_every_dashboard_query_has_data_and_a_killed_agent_is_alerted(
    servers: Servers,
    database_url: str,
    unique: str,
    tmp_path: Path,
    prometheus_binary: str,
) -> None:
    started = time.monotonic()
    bootstrap = servers.endpoints.kafka_bootstrap
    prefix = f"{unique}."
    await create_topics(bootstrap, prefix, partitions=3)
    await migrated(database_url)
    await partitions_made(database_url)
    private_key, public_key = generate_key_pair()
    write_public_key_file(tmp_path / "control.pub", public_key)
    addresses = []
    while len(addresses) < 2:
        if (address := f"127.0.0.1:{choose_port(0)}") not in addresses:
            addresses.append(address)
    server = LocalPrometheus(
        tmp_path / "prometheus",
        [shortened_rules(tmp_path / "rules")],
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    url = server.start(port=0, targets=addresses)
    agents = [
        AgentProcess(
            agent_env(
                bootstrap,
                database_url,
                prefix,
                prefix,
                metrics_address=address,
                control_public_keys=tmp_path / "control.pub",
                batch_max_records=2000,
            ),
            tmp_path / f"agent{i}.log",
        ).start()
        for i, address in enumerate(addresses)
    ]
    stopped = asyncio.Event()
    producing = asyncio.create_task(produce_until(stopped, bootstrap, prefix))
    try:
        # Records that fail to decode, for the dead-letter panel.
        events = STREAM_BY_NAME["events"]
        await produce(
            bootstrap,
            prefix,
            [Outgoing(events, b"k%d" % i, b"{not json", poison="bad JSON") for i in range(5)],
        )

        async def both_scraped() -> bool:
            up = query(url, f'up{{job="{JOB}"}} == 1')
            return {r["metric"]["instance"] for r in up} == set(addresses)

        await until(both_scraped, within=60, what="Prometheus scrapes both agents")

        # A control command every instance applies or follows, for the control-plane panels.
        orchestrator = Antigravity(
            KafkaSettings(bootstrap_servers=bootstrap), prefix=prefix, private_key=private_key
        )
        await orchestrator.ensure_topics()
        await orchestrator.send(prefix, Activate(streams=("events",)), wait_s=30)

        queries = dashboard_queries()
        assert len(queries) >= 20
        empty = list(queries)

        async def every_query_has_data() -> bool:
            nonlocal empty
            empty = [(title, expr) for title, expr in empty if not query(url, expr)]
            if any(title == "Retries/s by kind" for title, _ in empty):
                await terminate_backends(database_url, unique)
            return not empty

        try:
            await until(every_query_has_data, within=90, what="data for every query", every=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still empty: {empty}") from exc
        # The Instance variable, label_values(pipeline_build_info, instance), lists both.
        variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]
        found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert found is not None, variable["definition"]
        metric, label = found.groups()
        values = api(url, f"/api/v1/label/{label}/values", **{"match[]": metric})["data"]
        assert sorted(values) == sorted(addresses)
        print(
            f"\n{len(queries)} dashboard queries have data after {time.monotonic() - started:.1f}s"
        )

        # Loaded and healthy, the rules (for: 1 s) fire only for the undecodable records, and
        # name their topic and error class. Nothing else: no stall, no missing commit, no
        # staleness (a moment of "not ready" while the writes were retried may pass first).
        poisoned = {
            "alertname": "PipelineDeadLetters",
            "job": JOB,
            "topic": f"{prefix}{events.topic}",
            "error_class": "DecodeError",
            "severity": "warning",
        }
        alerts: list[dict[str, str]] = []

        async def only_the_dead_letters_fire() -> bool:
            nonlocal alerts
            alerts = all_firing(url)
            return alerts == [poisoned]

        try:
            await until(only_the_dead_letters_fire, within=30, what="only PipelineDeadLetters")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; firing: {alerts}") from exc

        victim = agents[0]
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()

        async def agent_down_fires() -> bool:
            return any(
                labels.get("instance") == addresses[0] and labels.get("severity") == "critical"
                for labels in firing(url, "PipelineAgentDown")
            )

        await until(agent_down_fires, within=60, what="PipelineAgentDown for the killed agent")
        print(f"PipelineAgentDown firing {time.monotonic() - killed:.1f}s after the SIGKILL")
        assert not any(
            labels.get("instance") == addresses[1] for labels in firing(url, "PipelineAgentDown")
        ), "the agent still running is not down"
        assert agents[1].alive(), log_tail(agents[1].log_path or tmp_path / "agent1.log")
    finally:
        stopped.set()
        await asyncio.gather(producing, return_exceptions=True)
        for agent in agents:
            agent.kill()
        server.stop(report=lambda _: None)
    print(f"test took {time.monotonic() - started:.1f}s")


def test_dev_up_prometheus_scrapes_the_default_agent_with_the_rules(
    servers: Servers, tmp_path: Path, prometheus_binary: str
) -> None:
    """`pipeline dev up --prometheus` next to servers named by the environment: it starts only
    Prometheus (with the repository's rules, scraping 127.0.0.1:9108 from its targets file),
    `status` shows it, and `down` stops it by its pid."""
    home = tmp_path / "dev"
    env = {
        **os.environ,
        "PIPELINE_DEV_HOME": str(home),
        "KAFKA_BOOTSTRAP_SERVERS": servers.endpoints.kafka_bootstrap,
        "DATABASE_URL": servers.endpoints.database_url,
    }

    def dev(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PIPELINE, "dev", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    up = dev("up", "--prometheus")
    pid = None
    try:
        assert up.returncode == 0, up.stderr
        found = re.search(r"Prometheus at (http://127\.0\.0\.1:\d+) \(pid (\d+)\)", up.stderr)
        assert found is not None, up.stderr
        url, pid = found.group(1), int(found.group(2))
        targets = json.loads((home / "prometheus" / "targets.json").read_text())
        assert targets == [{"targets": ["127.0.0.1:9108"], "labels": {}}]
        assert str(home / "prometheus" / "targets.json") in up.stderr
        groups = api(url, "/api/v1/rules")["data"]["groups"]
        rules = [r["name"] for g in groups for r in g["rules"]]
        assert len(rules) == 16 and "PipelineAgentDown" in rules
        assert api(url, "/api/v1/status/config")["status"] == "success"

        status = dev("status")
        assert f"Prometheus: running (pid {pid}) at {url}" in status.stdout, status.stdout
        again = dev("up", "--prometheus")  # already running: the same one
        assert f"Prometheus at {url} (pid {pid})" in again.stderr, again.stderr

        down = dev("down")
        assert down.returncode == 0, down.stderr
        assert f"Prometheus stopped (pid {pid})" in down.stderr
        assert not is_alive(pid)
    finally:
        if pid is not None and is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_dev_up_prometheus_without_the_binary_says_what_to_install(
    servers: Servers, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "PATH": str(tmp_path),  # no prometheus on it
        "PIPELINE_DEV_HOME": str(tmp_path / "dev"),
        "KAFKA_BOOTSTRAP_SERVERS": servers.endpoints.kafka_bootstrap,
        "DATABASE_URL": servers.endpoints.database_url,
    }
    result = subprocess.run(
        [*PIPELINE, "dev", "up", "--prometheus"],
        cwd=ROOT,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "prometheus is not installed" in result.stderr
    assert "apt-get install prometheus" in result.stderr
