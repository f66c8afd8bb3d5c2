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
from urllib.parse import parse_qs, urlsplit

import pytest

from pipeline.config import SETTINGS, Config, env_name, load_config
from pipeline.devstack import kafka_auth, postgres, provision
from pipeline.devstack.kafka import SecureListener, _secure_properties, _server_properties
from pipeline.devstack.kafka_versions import DEFAULT_VERSION, release
from pipeline.devstack.postgres import SERVER_SETTINGS
from pipeline.kafka_settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "agent-pipeline:local"
AGENTS = ("agent-1", "agent-2")
MAINTAINER = "partition-maintainer"  # `pipeline partitions maintain --every 1h`
# One-shot services: each runs to its end (the simulator after SIMULATOR_DURATION_S).
JOBS = {"secrets", "logins", "kafka-users", "keys", "migrate", "topics", "simulator", "antigravity"}
PROVISIONING = {"secrets", "logins", "kafka-users"}  # pipeline.devstack.provision
# Who each pipeline service is: its PostgreSQL login (None: it never connects) and its Kafka
# user (None: it uses no Kafka), the local stack's (docs/security.md).
IDENTITIES = {
    "agent-1": (postgres.AGENT, kafka_auth.AGENT_USER),
    "agent-2": (postgres.AGENT, kafka_auth.AGENT_USER),
    "migrate": (postgres.MIGRATOR, None),
    MAINTAINER: (postgres.MIGRATOR, None),
    "topics": (postgres.ANALYST, kafka_auth.ORCHESTRATOR_USER),
    "antigravity": (postgres.ANALYST, kafka_auth.ORCHESTRATOR_USER),
    "simulator": (None, kafka_auth.PRODUCER_USER),
}
LONG_RUNNING = {"kafka", "postgres", *AGENTS, MAINTAINER, "prometheus", "grafana"}
PUBLISHED = {
    "kafka": {9092: 9092},
    "postgres": {5432: 5432},
    "agent-1": {9108: 9108},
    "agent-2": {9109: 9108},
    "prometheus": {9090: 9090},
    "grafana": {3000: 3000},
}
SECRETS_ROOT = "/run/secrets"  # where compose.yaml mounts the secrets volumes
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
    # The secrets first; the logins and users once their server is healthy; then the schema
    # (as the migrator) and the topics (as the orchestrator).
    assert {on for name, on in waits if name in {"postgres", "grafana"}} >= {"secrets"}
    assert waits[("logins", "postgres")] == waits[("kafka-users", "kafka")] == "service_healthy"
    assert {on for name, on in waits if name == "migrate"} == {"logins"}
    assert {on for name, on in waits if name == "topics"} == {"kafka-users"}
    assert {on for name, on in waits if name == MAINTAINER} == {"migrate"}
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
    assert ours == set(AGENTS) | JOBS | {MAINTAINER}
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


@pytest.fixture(scope="module", autouse=True)
def secret_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the secrets job makes (pipeline.devstack.provision.make_secrets, run here as it
    runs there, as root), for :func:`_settings`: a service's settings name files in them,
    which loading its settings reads."""
    stores = tmp_path_factory.mktemp("secrets")
    provision.make_secrets(stores)
    _STORES.append(stores)
    return stores


_STORES: list[Path] = []


def _settings(service: dict[str, Any]) -> Config:
    """The service's settings as it loads them, its secret files read from
    :func:`secret_stores` (where its volumes would be mounted)."""
    environment: dict[str, str] = service["environment"]
    known = {env_name(setting) for setting in SETTINGS}
    assert set(environment) <= known, set(environment) - known
    here = {k: v.replace(f"{SECRETS_ROOT}/", f"{_STORES[-1]}/") for k, v in environment.items()}
    return load_config(here)


def _in_container(path: str) -> str:
    """A path of :func:`_settings` as the container sees it."""
    return path.replace(f"{_STORES[-1]}/", f"{SECRETS_ROOT}/")


def test_the_pipeline_settings_are_valid_and_the_tests_own(services: dict[str, Any]) -> None:
    default = Config(kafka=KafkaSettings(bootstrap_servers="x"), database_url="x")
    assert set(IDENTITIES) == set(AGENTS) | {MAINTAINER} | JOBS - {"keys"} - PROVISIONING
    for name in IDENTITIES:
        config = _settings(services[name])
        assert config.kafka.bootstrap_servers == "kafka:29092", name
        assert urlsplit(config.database_url).netloc.endswith("@postgres:5432"), name
        assert urlsplit(config.database_url).path == f"/{postgres.DATABASE}", name
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
    addresses |= {"controller.quorum.voters", "log.dirs", "inter.broker.listener.name"}
    expected = {
        "KAFKA_" + k.upper().replace(".", "_"): v
        for k, v in properties.items()
        if k not in addresses
    }
    environment = kafka["environment"]
    assert {k: environment.get(k) for k in expected} == expected
    listeners = environment["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert listeners == [
        "HOST://127.0.0.1:9092",
        "DOCKER://kafka:29092",
        "ADMIN://127.0.0.1:9095",
    ]


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


# -- the security model: the local stack's logins, roles, users, ACLs; no default password --


def _property(variable: str) -> str:
    """The broker property an apache/kafka image's environment variable sets (its
    docker/resources/utility: ``_`` is ``.``, ``__`` is ``_``, ``___`` is ``-``)."""
    key = variable.removeprefix("KAFKA_")
    key = re.sub(r"(?<=[^_])_(?=[^_])", ".", key)
    return key.replace("___", "-").replace("__", "_").lower()


def _secret(service: dict[str, Any], path: str) -> tuple[str, str]:
    """(store, file) of a secret file ``path`` the service names, after checking that it
    mounts that store's volume there, read-only, and that the store holds that file."""
    store, name = Path(path).relative_to(SECRETS_ROOT).parts
    mounts = {v["target"]: v for v in service.get("volumes", [])}
    mount = mounts[f"{SECRETS_ROOT}/{store}"]
    assert (mount["type"], mount["source"], mount.get("read_only")) == (
        "volume",
        f"secrets-{store}",
        True,
    )
    assert name in provision.STORES[store].files, (store, name)
    return store, name


def _secret_mounts(service: dict[str, Any]) -> set[str]:
    return {
        v["source"].removeprefix("secrets-")
        for v in service.get("volumes", [])
        if v.get("source", "").startswith("secrets-")
    }


_LOGINS = postgres.logins(Path())
# Each login's password file, as the local stack names it.
PASSFILES = {x.user: x.passfile.name for x in (_LOGINS.migrator, _LOGINS.agent, _LOGINS.analyst)}


def test_each_service_logs_in_as_the_local_stacks_login_and_kafka_user(
    services: dict[str, Any],
) -> None:
    for name, (login, user) in IDENTITIES.items():
        service = services[name]
        config = _settings(service)
        url = urlsplit(config.database_url)
        used: set[str] = set()
        if login is None:  # a required setting it never connects with: no password at all
            assert "passfile" not in url.query and url.password is None, name
        else:
            assert (url.username, url.password) == (login, None), name
            (passfile,) = parse_qs(url.query)["passfile"]
            store, file = _secret(service, _in_container(passfile))
            assert file == PASSFILES[login]
            used.add(store)
        if user is None:
            assert config.kafka.security_protocol == "PLAINTEXT", name  # it uses no Kafka
        else:
            assert config.kafka.security_protocol == "SASL_PLAINTEXT", name
            assert config.kafka.sasl_mechanism == kafka_auth.MECHANISM, name
            assert config.kafka.sasl_username == user, name
            assert config.kafka.sasl_password == "", name  # from its file only
            store, file = _secret(service, _in_container(config.kafka.sasl_password_file))
            assert file == kafka_auth.password_file(Path(), user).name
            used.add(store)
        assert _secret_mounts(service) == used, name  # no other secrets
    # The agents' group and topics are the ones the ACLs name (kafka_auth.pipeline_acls()).
    for agent in AGENTS:
        config = _settings(services[agent])
        assert (config.group_id, config.topic_prefix) == (kafka_auth.DEFAULT_GROUP, "")


def test_postgres_has_no_trust_and_the_local_stacks_superuser(services: dict[str, Any]) -> None:
    server = services["postgres"]
    environment = server["environment"]
    assert environment["POSTGRES_USER"] == postgres.SUPERUSER
    assert "POSTGRES_PASSWORD" not in environment
    assert _secret(server, environment["POSTGRES_PASSWORD_FILE"]) == (
        "postgres",
        provision.SUPERUSER_PASSWORD_FILE,
    )
    assert environment["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert environment["POSTGRES_INITDB_ARGS"] == "--auth=scram-sha-256"  # the socket too
    assert "password_encryption=scram-sha-256" in server["command"]
    # The database is the logins job's (owned by the migrator), not the image's.
    assert environment["POSTGRES_DB"] != postgres.DATABASE
    assert not any("trust" in json.dumps(s.get("environment", {})) for s in services.values())


def test_the_logins_job_runs_the_local_stacks_code_as_the_superuser(
    services: dict[str, Any],
) -> None:
    job = services["logins"]
    assert job["entrypoint"] == ["python", "-m", "pipeline.devstack.provision"]
    command, *args = job["command"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert command == "postgres" and set(options) == {"--admin-url", "--secrets"}
    url = urlsplit(options["--admin-url"])
    assert (url.username, url.hostname, url.port) == (postgres.SUPERUSER, "postgres", 5432)
    (passfile,) = parse_qs(url.query)["passfile"]
    assert _secret(job, passfile) == ("admin", provision.POSTGRES_SUPERUSER_FILE)
    assert options["--secrets"] == f"{SECRETS_ROOT}/admin"
    assert _secret_mounts(job) == {"admin"}
    # ... the directory of the logins' password files, as postgres.logins() names them.
    logins = postgres.logins(Path(options["--secrets"]))
    for login in (logins.migrator, logins.agent, logins.analyst):
        _secret(job, str(login.passfile))


def test_kafka_has_the_local_stacks_sasl_authorizer_and_acls(
    services: dict[str, Any], tmp_path: Path
) -> None:
    kafka = services["kafka"]
    properties = {_property(k): str(v) for k, v in kafka["environment"].items()}
    for pem in ("cert.pem", "key.pem"):
        (tmp_path / pem).write_text("PEM\n")
    secure = SecureListener(9094, tmp_path / "cert.pem", tmp_path / "key.pem")
    local = dict(
        line.split("=", 1)
        for line in _secure_properties(secure).splitlines()
        if line and not line.startswith("ssl.")  # TLS: the local stack's, not compose's
    )
    jaas = local.pop("listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config")
    assert {k: properties.get(k) for k in local} == local
    protocols = dict(
        pair.split(":") for pair in properties["listener.security.protocol.map"].split(",")
    )
    listeners = dict(
        (entry.split("://")[0], entry.split("://")[1])
        for entry in properties["listeners"].split(",")
    )
    sasl = {name for name, protocol in protocols.items() if protocol.startswith("SASL_")}
    assert sasl == {"HOST", "DOCKER"}
    for name in sasl:
        key = f"listener.name.{name.lower()}.scram-sha-512.sasl.jaas.config"
        assert properties[key] == jaas
    # The listeners without authentication (whose anonymous principal is the super user)
    # are on the container's loopback only; the published and the compose network's are SASL.
    for name, protocol in protocols.items():
        if name not in sasl:
            assert protocol == "PLAINTEXT" and listeners[name].startswith("127.0.0.1:"), name
    published = {int(p["target"]) for p in kafka["ports"]}
    assert {int(listeners[n].rsplit(":", 1)[1]) for n in sasl} >= published
    # The health check asks the loopback listener, as a client inside the container.
    assert kafka["healthcheck"]["test"][-1] == listeners["ADMIN"]

    # The users and ACLs: the kafka-users job runs the local stack's own code
    # (kafka_auth.set_up with kafka_auth.pipeline_acls()) on that loopback listener, from
    # inside the broker's network namespace, with every user's password.
    job = services["kafka-users"]
    assert job["network_mode"] == "service:kafka"
    assert job["entrypoint"] == ["python", "-m", "pipeline.devstack.provision"]
    command, *args = job["command"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert command == "kafka"
    assert options["--bootstrap"] == listeners["ADMIN"]
    for user in kafka_auth.USERS:
        _secret(job, str(kafka_auth.password_file(Path(options["--secrets"]), user)))


def test_no_default_passwords_every_secret_is_made_by_the_secrets_job(
    services: dict[str, Any],
) -> None:
    grafana = services["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert _secret(services["grafana"], grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"]) == (
        "grafana",
        provision.GRAFANA_ADMIN_FILE,
    )
    passwords = re.compile(r"PASSWORD(?!_FILE|__FILE)|SECRET", re.IGNORECASE)
    for name, service in services.items():
        for variable in service.get("environment") or {}:
            assert not passwords.search(variable), (name, variable)
    job = services["secrets"]
    assert job["user"] == "0:0"  # it gives each store to its user
    assert job["command"] == ["secrets", "--stores", "/stores"]
    mounts = {v["target"]: v["source"] for v in job["volumes"]}
    assert mounts == {f"/stores/{store}": f"secrets-{store}" for store in provision.STORES}
    used = set().union(*(_secret_mounts(s) for n, s in services.items() if n != "secrets"))
    assert used == set(provision.STORES)


def _store_files(root: Path) -> dict[str, dict[str, tuple[int, int, int, str]]]:
    """Each store: each file's owner, group, mode and text (and the store's, as "")."""
    found: dict[str, dict[str, tuple[int, int, int, str]]] = {}
    for store in sorted(root.iterdir()):
        info = store.stat()
        found[store.name] = {"": (info.st_uid, info.st_gid, info.st_mode & 0o7777, "")}
        for path in sorted(store.iterdir()):
            info = path.lstat()
            found[store.name][path.name] = (
                info.st_uid,
                info.st_gid,
                info.st_mode & 0o7777,
                path.read_text(),
            )
    return found


def test_the_secrets_job_makes_each_password_once_for_its_users_only(tmp_path: Path) -> None:
    provision.make_secrets(tmp_path)
    made = _store_files(tmp_path)
    assert set(made) == set(provision.STORES)
    password: dict[str, str] = {}
    for name, store in provision.STORES.items():
        owner = (store.owner.uid, store.owner.gid)
        assert made[name][""][:3] == (*owner, 0o700), name
        assert set(made[name]) - {""} == set(store.files), name
        for file, (uid, gid, mode, text) in made[name].items():
            if file:
                assert ((uid, gid), mode) == (owner, 0o600), (name, file)
                value = text.rstrip("\n").rsplit(":", 1)[-1]
                assert len(value) >= 32 and text.count("\n") == 1
                # The same password wherever it is copied; the superuser's in both forms.
                key = "superuser" if "pipeline.pgpass" in file or "superuser" in file else file
                assert password.setdefault(key, value) == value, (name, file)
    assert made["admin"][f"pg-{postgres.AGENT}.pgpass"][3].startswith(f"*:*:*:{postgres.AGENT}:")
    assert len(set(password.values())) == len(password)  # each its own
    provision.make_secrets(tmp_path)  # again: the passwords are kept
    assert _store_files(tmp_path) == made


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
