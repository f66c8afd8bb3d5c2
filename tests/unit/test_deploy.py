"""compose.yaml, the Dockerfile and deploy/'s Prometheus and Grafana files, checked without a
Docker engine: Docker Compose itself resolves compose.yaml (`docker compose config` needs no
engine), the agents' health check and the key job's script run here against stand-ins, and
the Dockerfile's install steps run in a throwaway virtual environment.

`docker compose` missing fails these tests with how to install it (deploy/install-compose).
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, env_name, load_config
from pipeline.devstack.kafka import _server_properties
from pipeline.devstack.kafka_versions import DEFAULT_VERSION, release
from pipeline.devstack.postgres import SERVER_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "agent-pipeline:local"
AGENTS = ("agent-1", "agent-2")
# One-shot services: each runs to its end (the simulator after SIMULATOR_DURATION_S).
JOBS = {"keys", "migrate", "topics", "simulator", "antigravity"}
LONG_RUNNING = {"kafka", "postgres", *AGENTS, "prometheus", "grafana"}
PUBLISHED = {
    "kafka": {9092: 9092},
    "postgres": {5432: 5432},
    "agent-1": {9108: 9108},
    "agent-2": {9109: 9108},
    "prometheus": {9090: 9090},
    "grafana": {3000: 3000},
}
HOW_TO_INSTALL = (
    "run deploy/install-compose: it builds Docker Compose from its Go module (needs Go; "
    "about a minute) and installs it as the docker CLI's plugin"
)


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose --file compose.yaml ARGS`, with the file's own defaults, not whatever
    this shell exports for Compose or the simulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "SIMULATOR_"))}
    return subprocess.run(
        ["docker", "compose", "--file", str(ROOT / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> None:
    """Fails, saying how to install it, when `docker compose` does not run."""
    if shutil.which("docker") is None:
        pytest.fail(
            "the docker CLI is missing (Debian: apt-get install docker.io); then " + HOW_TO_INSTALL
        )
    version = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=60, check=False
    )
    if version.returncode != 0:
        pytest.fail(f"`docker compose` does not run ({version.stderr.strip()}): {HOW_TO_INSTALL}")


@pytest.fixture(scope="module")
def services(compose: None) -> dict[str, Any]:
    """compose.yaml as Docker Compose resolves it, every profile included."""
    result = _compose("--profile", "tools", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = json.loads(result.stdout)["services"]
    return resolved


def test_compose_accepts_the_file_without_a_warning(compose: None) -> None:
    result = _compose("config", "--quiet")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_every_service_is_healthchecked_or_a_job_that_ends(services: dict[str, Any]) -> None:
    assert set(services) == LONG_RUNNING | JOBS
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck", {})
        assert check.get("test", ["NONE"])[0] == "CMD", name
        assert not check.get("disable", False), name
        assert services[name]["restart"] == "unless-stopped", name
    for name in JOBS:
        assert "healthcheck" not in services[name], name
        assert services[name]["restart"] == "no", name


def test_services_wait_for_jobs_to_succeed_and_for_servers_to_be_healthy(
    services: dict[str, Any],
) -> None:
    waits = {
        (name, on): dependency["condition"]
        for name, service in services.items()
        for on, dependency in service.get("depends_on", {}).items()
    }
    for (name, on), condition in waits.items():
        expected = "service_completed_successfully" if on in JOBS else "service_healthy"
        assert condition == expected, (name, on)
    assert {on for name, on in waits if name in AGENTS} == {"keys", "migrate", "topics"}
    assert waits[("migrate", "postgres")] == waits[("topics", "kafka")] == "service_healthy"
    assert {on for name, on in waits if name == "simulator"} == set(AGENTS)


def test_every_port_is_published_on_loopback_only(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
    published = {
        name: {int(p["published"]): p["target"] for p in service.get("ports", [])}
        for name, service in services.items()
        if service.get("ports")
    }
    assert published == PUBLISHED


def test_the_pipeline_services_run_one_image_built_from_this_tree(
    services: dict[str, Any],
) -> None:
    ours = {name for name, s in services.items() if s["image"] == IMAGE}
    assert ours == set(AGENTS) | JOBS
    for name in ours:
        assert services[name]["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile"}
        assert services[name]["pull_policy"] == "never", name
    first, second = (services[a] for a in AGENTS)
    assert first["command"] == ["run"]
    different = {"environment", "ports"}
    assert {k: v for k, v in first.items() if k not in different} == {
        k: v for k, v in second.items() if k not in different
    }
    # Docker's SIGKILL comes after the agent's own shutdown deadline, not before.
    stop_grace = int(first["stop_grace_period"].removesuffix("s"))
    assert stop_grace > _settings(first).shutdown_timeout_s


def _settings(service: dict[str, Any]) -> Config:
    environment: dict[str, str] = service["environment"]
    known = {env_name(field) for field in Config.__struct_fields__}
    assert set(environment) <= known, set(environment) - known
    return load_config(environment)


def test_the_pipeline_settings_are_valid_and_the_tests_own(services: dict[str, Any]) -> None:
    default = Config(kafka_bootstrap_servers="x", database_url="x")
    for name in set(AGENTS) | JOBS - {"keys"}:
        config = _settings(services[name])
        assert config.kafka_bootstrap_servers == "kafka:29092", name
        assert config.database_url == "postgresql://pipeline@postgres:5432/pipeline", name
        # `pipeline topics create` and the agents: 6 partitions per data topic, as the tests
        # and the benchmark create them.
        assert config.topic_partitions == default.topic_partitions == 6, name
        assert (config.group_id, config.topic_prefix) == (default.group_id, ""), name
    agents = [_settings(services[a]) for a in AGENTS]
    assert [c.instance_id for c in agents] == list(AGENTS)
    assert {c.metrics_address for c in agents} == {"0.0.0.0:9108"}
    for agent, config in zip(AGENTS, agents, strict=True):
        (key,) = config.control_public_keys
        mounts = {v["target"]: v for v in services[agent]["volumes"]}
        mount = mounts[str(Path(key).parent)]
        assert (mount["source"], mount.get("read_only")) == ("control-public-keys", True)
        url = services[agent]["healthcheck"]["test"][-1]
        assert "http://127.0.0.1:9108/readyz" in url


def test_kafka_has_the_local_stacks_settings(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{DEFAULT_VERSION}"
    properties = dict(
        line.split("=", 1)
        for line in _server_properties(
            release(DEFAULT_VERSION), Path("/data"), 9092, 9093
        ).splitlines()
        if line and not line.startswith("#")
    )
    # Where the broker listens and keeps its data differs in a container, by design.
    addresses = {"listeners", "advertised.listeners", "listener.security.protocol.map"}
    addresses |= {"controller.quorum.voters", "log.dirs"}
    expected = {
        "KAFKA_" + k.upper().replace(".", "_"): v
        for k, v in properties.items()
        if k not in addresses
    }
    environment = kafka["environment"]
    assert {k: environment.get(k) for k in expected} == expected
    listeners = environment["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert listeners == ["PLAINTEXT://127.0.0.1:9092", "DOCKER://kafka:29092"]


def test_postgres_has_the_local_stacks_settings(services: dict[str, Any]) -> None:
    command = services["postgres"]["command"]
    assert command[0] == "postgres"
    flags, settings = command[1::2], command[2::2]
    assert set(flags) == {"-c"}
    expected = dict(SERVER_SETTINGS)
    # A container listens on its own interfaces; the image chooses the socket directory; it
    # has no certificate of the local stack's CA, so no TLS (said in compose.yaml).
    del expected["listen_addresses"], expected["unix_socket_directories"], expected["ssl"]
    assert dict(s.split("=", 1) for s in settings) == expected


def _mount(service: dict[str, Any], source: Path) -> dict[str, Any]:
    mount: dict[str, Any]
    (mount,) = (v for v in service["volumes"] if v.get("source") == str(source))
    assert (mount["type"], mount.get("read_only")) == ("bind", True)
    return mount


def _block(text: str, start: str) -> str:
    """The lines of a YAML list item from the one holding ``start`` to the next item."""
    match = re.search(rf"^(\s*)- {re.escape(start)}\n((?:\1 .*\n|\s*\n)*)", text, re.MULTILINE)
    assert match is not None, start
    return match.group(2)


def test_prometheus_scrapes_both_agents_and_loads_the_rules(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    config = _mount(prometheus, ROOT / "deploy/prometheus/prometheus.yml")
    assert config["target"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    rules = _mount(prometheus, ROOT / "deploy/prometheus/rules")
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    (pattern,) = re.findall(r"^rule_files:\n\s+- (\S+)$", text, re.MULTILINE)
    assert Path(pattern).parent == Path(rules["target"])
    assert fnmatch.fnmatch("pipeline.rules.yml", Path(pattern).name)
    targets = re.findall(r"^\s+- (\S+:\d+)$", _block(text, "job_name: database-agent"), re.M)
    ports = {a: _settings(services[a]).metrics_address.rpartition(":")[2] for a in AGENTS}
    assert targets == [f"{agent}:{port}" for agent, port in ports.items()]


def test_grafana_provisions_prometheus_and_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    provisioning = _mount(grafana, ROOT / "deploy/grafana/provisioning")
    assert provisioning["target"] == "/etc/grafana/provisioning"
    dashboards = _mount(grafana, ROOT / "deploy/grafana/dashboards")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboards["target"] + "/pipeline.json"

    (datasources,) = (ROOT / "deploy/grafana/provisioning/datasources").glob("*.yml")
    source = _block(datasources.read_text(), "name: Prometheus")
    assert re.findall(r"^\s+(uid|type|url): (\S+)$", source, re.MULTILINE) == [
        ("uid", "prometheus"),
        ("type", "prometheus"),
        ("url", f"http://prometheus:{services['prometheus']['ports'][0]['target']}"),
    ]
    (providers,) = (ROOT / "deploy/grafana/provisioning/dashboards").glob("*.yml")
    paths = re.findall(r"^\s+path: (\S+)$", providers.read_text(), re.MULTILINE)
    assert paths == [dashboards["target"]]


class _Readiness(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b"ready" if self.status == 200 else b"database unreachable"
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def readyz() -> Iterator[tuple[http.server.HTTPServer, type[_Readiness]]]:
    handler = type("Handler", (_Readiness,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_agents_health_check_follows_readyz(
    services: dict[str, Any], readyz: tuple[http.server.HTTPServer, type[_Readiness]]
) -> None:
    server, handler = readyz
    cmd, program, *args = services["agent-1"]["healthcheck"]["test"]
    assert (cmd, program) == ("CMD", "python")
    port = server.server_address[1]
    check = [sys.executable, *(a.replace("127.0.0.1:9108", f"127.0.0.1:{port}") for a in args)]

    def healthy() -> bool:
        return subprocess.run(check, capture_output=True, timeout=30, check=False).returncode == 0

    assert healthy()
    handler.status = 503
    assert not healthy()
    handler.status = 200
    assert healthy()
    server.shutdown()
    server.server_close()
    assert not healthy()  # nothing listens


def test_the_keys_job_makes_one_key_pair_and_keeps_it(
    services: dict[str, Any], tmp_path: Path
) -> None:
    keys = services["keys"]
    assert keys["entrypoint"] == ["sh", "-c"]
    (script,) = keys["command"]
    volumes = {v["target"]: v["source"] for v in keys["volumes"]}
    assert volumes == {
        "/var/lib/pipeline/keys/private": "control-private-key",
        "/var/lib/pipeline/keys/public": "control-public-keys",
    }
    home = tmp_path / "keys"
    for directory in ("private", "public"):  # the two volumes
        (home / directory).mkdir(parents=True)
    script = script.replace("/tmp/keys", str(tmp_path / "new"))
    script = script.replace("/var/lib/pipeline/keys", str(home))
    bin_dir = tmp_path / "bin"  # `pipeline` is this tree's, as the image's is
    bin_dir.mkdir()
    (bin_dir / "pipeline").write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pipeline.cli "$@"\n'
    )
    (bin_dir / "pipeline").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run() -> str:
        done = subprocess.run(
            ["sh", "-c", script],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "private key:" in run()
    private, public = home / "private/antigravity.key", home / "public/antigravity.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    made = (private.read_bytes(), public.read_bytes())
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == [
        "antigravity.key",
        "antigravity.pub",
    ]
    assert run() == "control key pair exists\n"
    assert (private.read_bytes(), public.read_bytes()) == made


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), one list per stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), " ".join(arguments.split())))
    return stages


def test_the_image_runs_as_an_unprivileged_user_it_creates() -> None:
    final = _dockerfile_stages()[-1]
    (user,) = [args for keyword, args in final if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid not in {"0", "root"}
    created = [args for keyword, args in final if keyword == "RUN" and "useradd" in args]
    assert len(created) == 1 and f"--uid {uid} " in created[0]
    assert [args for keyword, args in final if keyword == "ENTRYPOINT"] == ['["pipeline"]']


def test_the_final_stage_holds_no_build_tools() -> None:
    final = _dockerfile_stages()[-1]
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert not re.search(r"apt-get|apk |gcc|build-essential|\bmake\b", runs)
    assert "pip uninstall --yes pip setuptools wheel" in runs
    # Only the wheels come from the build stage, and only for the install's duration.
    assert [args for keyword, args in final if keyword in {"COPY", "ADD"}] == []
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in runs


def test_the_build_context_is_what_the_dockerfile_copies() -> None:
    build = _dockerfile_stages()[0]
    copied = {
        source.rstrip("/")
        for keyword, args in build
        if keyword == "COPY"
        for source in args.split()[:-1]
    }
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*"  # everything else stays out
    assert {r.removeprefix("!").rstrip("/") for r in rules if r.startswith("!")} == copied
    # The package's modules and the migrations it carries (pipeline/sql links to sql/).
    assert {"pipeline", "producers", "consumers", "sql", "pyproject.toml"} <= copied


def test_the_dockerfiles_install_steps_install_the_package_from_the_source(
    tmp_path: Path,
) -> None:
    """The RUN lines that build and install the package, run here as the Dockerfile has them
    (paths moved under tmp_path), into a fresh virtual environment."""
    build, final = _dockerfile_stages()[0], _dockerfile_stages()[-1]
    source, wheels = tmp_path / "src", tmp_path / "wheels"
    source.mkdir()
    for keyword, args in build:
        if keyword == "COPY":
            for name in args.split()[:-1]:
                if (ROOT / name).is_dir():
                    shutil.copytree(
                        ROOT / name,
                        source / name,
                        symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"),  # as .dockerignore
                    )
                else:
                    shutil.copy2(ROOT / name, source / name)
    # The build stage's pip wheel, then the final stage's install (its --mount flag dropped).
    (wheel,) = [a for k, a in build if k == "RUN" and a.startswith("pip wheel")]
    (install,) = [a for k, a in final if k == "RUN" and "pip install" in a]
    install = re.sub(r"^(--mount=\S+ )+", "", install)
    for name, step, cwd in (("build", wheel, source), ("image", install, tmp_path)):
        environment = tmp_path / name
        venv.create(environment, with_pip=True)
        env = {**os.environ, "PATH": f"{environment / 'bin'}:{os.environ['PATH']}"}
        env.pop("PYTHONPATH", None)
        done = subprocess.run(
            # pip may use its download cache here: --no-cache-dir keeps the image small.
            ["sh", "-c", step.replace("/wheels", str(wheels)).replace("--no-cache-dir ", "")],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    image = tmp_path / "image/bin"
    (cmd,) = [a for k, a in final if k == "CMD"]
    help_text = subprocess.run(
        [image / "pipeline", *json.loads(cmd)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: pipeline")
    # Installed, not this tree: the package's own copy of the migrations.
    probe = "from pipeline import db; print(db.SQL_DIR); print(len(db.read_migrations()))"
    found = subprocess.run(
        [image / "python", "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    sql_dir, count = found.stdout.split()
    assert Path(sql_dir).is_relative_to(tmp_path / "image")
    assert int(count) == len(list((ROOT / "sql").glob("*.sql"))) > 0
    assert not (image / "pip").exists()  # uninstalled: no installer in the image
