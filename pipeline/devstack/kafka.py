"""A single-node KRaft Apache Kafka broker run from Maven Central jars on the machine's Java."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka.errors import KafkaError

from pipeline import kafka_clients
from pipeline.devstack.kafka_versions import Release
from pipeline.devstack.processes import PidFile, log_tail, spawn
from pipeline.errors import ConfigError, DevStackError
from pipeline.kafka_clients import KafkaSettings, kafka_settings

SCALA_VERSION = "2.13"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
DEFAULT_HEAP_OPTS = "-Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20"
# Where the stack home records the Kafka release that formatted its data directory.
VERSION_FILE = "kafka-version"
# A home whose data predates that record was formatted by the only release the stack ran then.
UNRECORDED_VERSION = "4.3.1"

_MAIN_CLASS = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"


def pom(release: Release) -> str:
    """A POM whose runtime dependencies are the broker of ``release`` and its logging."""
    dependencies = [("org.apache.kafka", f"kafka_{SCALA_VERSION}", release.version)]
    dependencies += release.major.logging
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>local.agent-pipeline</groupId>\n"
        "  <artifactId>kafka-runtime</artifactId>\n"
        f"  <version>{release.version}</version>\n"
        "  <packaging>pom</packaging>\n"
        "  <dependencies>\n"
        + "".join(
            f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{version}</version></dependency>\n"
            for group, artifact, version in dependencies
        )
        + "  </dependencies>\n</project>\n"
    )


def resolve_jars(cache_dir: Path, release: Release) -> Path:
    """Return a directory holding the broker's jars, resolving them with Maven once.

    The directory is reused on every later call; Maven's local repository also caches
    the downloads, so a second resolution (say after the cache was cleared) is offline.
    """
    version = release.version
    home = cache_dir / f"kafka-{version}"
    lib = home / "lib"
    complete = home / ".complete"
    if complete.exists():
        return lib
    java_binary()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevStackError(
            "Maven (mvn) is not on PATH; it resolves Kafka's jars from Maven Central. "
            "Install it (Debian: apt-get install maven; macOS: brew install maven)."
        )
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(pom(release))
    shutil.rmtree(lib, ignore_errors=True)
    result = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={lib}",
            # runtime, not compile: compile scope drops the broker's runtime-scoped modules.
            "-DincludeScope=runtime",
        ],
        cwd=home,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise DevStackError(
            f"Maven could not resolve org.apache.kafka:kafka_{SCALA_VERSION}:{version} "
            "from Maven Central. Check the version (PIPELINE_DEV_KAFKA or --kafka) and that "
            "Maven Central is reachable (a proxy or mirror goes in ~/.m2/settings.xml). "
            "Maven said:\n" + "\n".join(output)
        )
    if not any(lib.glob(f"kafka_{SCALA_VERSION}-{version}.jar")):
        raise DevStackError(f"Maven finished but {lib} holds no Kafka broker jar")
    complete.write_text(f"{version}\n")
    return lib


def java_binary() -> str:
    java = shutil.which("java")
    if java is None:
        raise DevStackError(
            "Java is not on PATH; the Kafka broker needs Java 17 or newer. "
            "Install it (Debian: apt-get install openjdk-17-jre-headless; "
            "macOS: brew install openjdk@17)."
        )
    return java


class KafkaBroker:
    """One KRaft node (broker and controller) of ``release`` with its data, log and pid under
    ``home``."""

    def __init__(self, home: Path, lib: Path, release: Release) -> None:
        self.home = home
        self.lib = lib
        self.release = release
        self.data_dir = home / "data"
        self.log_path = home / "broker.log"
        self.properties = home / "server.properties"
        self.pidfile = pidfile(home)

    def start(
        self,
        port: int,
        controller_port: int,
        secure: SecureListener | None = None,
        *,
        proxied: Sequence[ProxiedListener] = (),
    ) -> int:
        """Start the broker: a PLAINTEXT listener on ``port``, the controller on
        ``controller_port``, the SASL_SSL listener ``secure`` says, if any, and the
        ``proxied`` listeners."""
        self.home.mkdir(parents=True, exist_ok=True)
        properties = _server_properties(
            self.release, self.data_dir, port, controller_port, secure, proxied=proxied
        )
        # With the SASL_SSL listener it holds a private key: its owner's only, like key files.
        fd = os.open(self.properties, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(properties)
        self._format_once()
        heap = os.environ.get("KAFKA_HEAP_OPTS", DEFAULT_HEAP_OPTS).split()
        pid = spawn(
            [java_binary(), *heap, *self._java_options(), _MAIN_CLASS, str(self.properties)],
            self.log_path,
        )
        self.pidfile.write(pid)
        return pid

    def _java_options(self) -> list[str]:
        """The class path and the logging configuration (written here) of this release."""
        major = self.release.major
        log_config = self.home / major.log_config_name
        log_config.write_text(major.log_config)
        return [major.log_option.format(path=log_config), "-cp", f"{self.lib}/*"]

    def _format_once(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        # Recorded before the format: the record counts only once the format wrote meta.properties.
        (self.home / VERSION_FILE).write_text(f"{self.release.version}\n")
        cluster_id = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if cluster_id.startswith("-"):
            cluster_id = "A" + cluster_id[1:]
        result = subprocess.run(
            [
                java_binary(),
                *self._java_options(),
                _STORAGE_TOOL,
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.properties),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DevStackError(
                f"formatting Kafka storage in {self.data_dir} failed:\n"
                f"{result.stdout}{result.stderr}"
            )

    def wait_ready(self, bootstrap: KafkaSettings | str, timeout: float) -> None:
        """Wait until a Kafka client sees this broker in the cluster metadata."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile.live_pid() is None:
                raise DevStackError(
                    f"the Kafka broker exited during start-up; the end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            if asyncio.run(broker_in_metadata(bootstrap)):
                return
            time.sleep(0.2)
        raise DevStackError(
            f"the Kafka broker did not become ready within {timeout:.0f}s; "
            f"the end of {self.log_path}:\n" + log_tail(self.log_path)
        )


@dataclass(frozen=True)
class SecureListener:
    """The broker's SASL_SSL listener: its port, and the certificate and key it presents."""

    port: int
    cert: Path
    key: Path


@dataclass(frozen=True)
class ProxiedListener:
    """A further PLAINTEXT listener on ``port`` that tells its clients to connect to
    ``advertised`` (HOST:PORT), a proxy in front of it: the network fault tests' Toxiproxy
    (docs/testing.md), through which every connection after the bootstrap then goes too."""

    name: str  # the listener's name, upper case
    port: int
    advertised: str


def pidfile(home: Path) -> PidFile:
    return PidFile(home / "broker.pid", _MAIN_CLASS)


def data_version(home: Path) -> str | None:
    """The Kafka release that formatted the data of the broker home ``home``; None when it
    holds no formatted data."""
    if not (home / "data" / "meta.properties").exists():
        return None
    try:
        return (home / VERSION_FILE).read_text().strip()
    except FileNotFoundError:
        return UNRECORDED_VERSION


def check_data_version(home: Path, version: str) -> None:
    """Refuse to run Kafka ``version`` on data another release formatted: the stack moves
    neither up nor down between releases."""
    found = data_version(home)
    if found is not None and found != version:
        raise DevStackError(other_version_message(home / "data", found, version))


def other_version_message(data_dir: Path, found: str, wanted: str) -> str:
    return (
        f"the Kafka data in {data_dir} was formatted by Kafka {found}, but this `up` would run "
        f"Kafka {wanted}. Run Kafka {found} (PIPELINE_DEV_KAFKA={found}, or `pipeline dev "
        f"up --kafka {found}`), or remove the data with `pipeline dev down --purge` (it is "
        f"lost), or use another PIPELINE_DEV_HOME for Kafka {wanted}."
    )


def has_secure_listener(home: Path) -> bool:
    """Whether the broker of ``home`` was last started with the SASL_SSL listener (one from a
    stack home older than the listener has none until it restarts)."""
    try:
        return "SASL_SSL://" in (home / "server.properties").read_text()
    except FileNotFoundError:
        return False


async def broker_in_metadata(kafka: KafkaSettings | str, probe_timeout: float = 2.0) -> bool:
    """True when a client bootstrapped from ``kafka`` sees at least one broker."""
    return await why_not_answering(kafka, probe_timeout) is None


async def why_not_answering(kafka: KafkaSettings | str, probe_timeout: float = 2.0) -> str | None:
    """None when a client bootstrapped from ``kafka`` sees at least one broker in the cluster
    metadata within ``probe_timeout`` seconds, else what it saw instead."""
    # A refused connection is the expected answer while the broker starts; aiokafka logs
    # each one as an error, which would drown the start-up output.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # The request's own timeout is longer than the probe's: silence is always "no answer".
    client_settings = kafka_settings(kafka)
    client = kafka_clients.bootstrap_client(
        client_settings, request_timeout_ms=int(probe_timeout * 1000) + 1000
    )
    try:
        # aiokafka reports a refused password or certificate as "Unable to bootstrap": ask why.
        await kafka_clients.check_connection(client_settings, probe_timeout)
        await asyncio.wait_for(client.bootstrap(), probe_timeout)
        # A broker that is still loading its cluster layout can answer with 0 brokers.
        if not client.cluster.brokers():
            return "the cluster metadata lists no broker yet"
        return None
    except TimeoutError:
        return f"no answer within {probe_timeout:g}s"
    except (KafkaError, OSError, ConfigError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        await client.close()


def _secure_properties(secure: SecureListener) -> str:
    """The SASL_SSL listener (SCRAM-SHA-512 over TLS, the key and certificate inline as PEM)
    and the authorizer. On the loopback, the plaintext listener's anonymous principal is a
    super user: the tests and the stack's own set-up use it. A dev-stack convenience, never a
    production setting."""
    return "\n".join(
        [
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.certificate.chain={_one_line(secure.cert.read_text())}",
            f"ssl.keystore.key={_one_line(secure.key.read_text())}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:ANONYMOUS",
            "allow.everyone.if.no.acl.found=false",
            "",
        ]
    )


def _one_line(pem: str) -> str:
    """A PEM block as one properties value: its line breaks as ``\\n`` escapes."""
    return pem.strip().replace("\n", "\\n")


def _server_properties(
    release: Release,
    data_dir: Path,
    port: int,
    controller_port: int,
    secure: SecureListener | None = None,
    *,
    proxied: Sequence[ProxiedListener] = (),
) -> str:
    sasl_ssl = "" if secure is None else f",SASL_SSL://127.0.0.1:{secure.port}"
    listening = "".join(f",{p.name}://127.0.0.1:{p.port}" for p in proxied)
    advertised = "".join(f",{p.name}://{p.advertised}" for p in proxied)
    protocols = "".join(f",{p.name}:PLAINTEXT" for p in proxied)
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port}{sasl_ssl}{listening},"
            f"CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}{sasl_ssl}{advertised}",
            "inter.broker.listener.name=PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
            + ("" if secure is None else ",SASL_SSL:SASL_SSL")
            + protocols,
            f"log.dirs={data_dir}",
            "num.partitions=1",
            # One node: every internal topic has one replica, and one offsets partition keeps
            # the first consumer-group join fast.
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            *release.major.properties,
            "group.initial.rebalance.delay.ms=0",
            # A broker restarted after a crash re-registers once the old registration expires:
            # seconds here, not the default 9 s.
            "broker.session.timeout.ms=3000",
            "broker.heartbeat.interval.ms=1000",
            "auto.create.topics.enable=false",
            "",
        ]
    ) + ("" if secure is None else _secure_properties(secure))
