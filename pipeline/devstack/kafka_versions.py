"""Which Kafka release the local stack runs, and what differs between Kafka's majors. Pure.

The stack runs any release of Kafka 3 from 3.7 on, and of Kafka 4, from Maven Central's
``org.apache.kafka:kafka_2.13`` (default 4.3.1). ``PIPELINE_DEV_KAFKA`` chooses one;
``pipeline dev up --kafka VERSION`` does for that command.

What the stack does the same way on both majors, checked against both: a KRaft node that is
broker and controller with a static quorum (``controller.quorum.voters``; 3.9's dynamic quorum,
``--standalone``, is not needed), storage formatted by ``kafka.tools.StorageTool format -t ID
-c FILE``, the SASL_SSL listener with inline PEM keys and the StandardAuthorizer, SCRAM users
and ACLs set by admin requests (:mod:`pipeline.devstack.kafka_auth`), and the classic consumer
group protocol, the default group protocol of both. What differs is :data:`MAJORS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import ConfigError

VERSION_ENV = "PIPELINE_DEV_KAFKA"
DEFAULT_VERSION = "4.3.1"
OLDEST_3 = 7  # Kafka 3.7: the oldest 3.x the stack runs (and is tested on, with 3.9)

Coordinate = tuple[str, str, str]  # Maven's groupId, artifactId, version

_LOG4J1 = """log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""

_LOG4J2 = """Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""

_LOG4J2_VERSION = "2.25.4"  # the version Kafka 4.3.1 is built against


@dataclass(frozen=True)
class Major:
    """What one Kafka major needs that the other does not."""

    # The SLF4J binding and logging backend that only Kafka's tarball ships (the broker's
    # POM names slf4j-api alone): without them the broker logs nothing.
    logging: tuple[Coordinate, ...]
    log_config_name: str  # the logging configuration file, in the broker's home
    log_config: str
    log_option: str  # the JVM option that names that file: ``{path}`` is replaced
    # Broker settings that only this major knows (another major warns of unknown ones).
    properties: tuple[str, ...]


MAJORS: Mapping[int, Major] = {
    # Kafka 3: log4j 1's API through reload4j, configured by a properties file.
    3: Major(
        logging=(
            ("org.slf4j", "slf4j-reload4j", "1.7.36"),
            ("ch.qos.reload4j", "reload4j", "1.2.25"),
        ),
        log_config_name="log4j.properties",
        log_config=_LOG4J1,
        log_option="-Dlog4j.configuration=file:{path}",
        properties=(),
    ),
    # Kafka 4: log4j 2, configured in YAML (KIP-653); share groups (KIP-932) have an internal
    # topic of their own, one replica here like every internal topic.
    4: Major(
        logging=(
            ("org.apache.logging.log4j", "log4j-slf4j-impl", _LOG4J2_VERSION),
            ("org.apache.logging.log4j", "log4j-api", _LOG4J2_VERSION),
            ("org.apache.logging.log4j", "log4j-core", _LOG4J2_VERSION),
        ),
        log_config_name="log4j2.yaml",
        log_config=_LOG4J2,
        log_option="-Dlog4j2.configurationFile={path}",
        properties=(
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
        ),
    ),
}

_VERSION = re.compile(r"(?P<major>\d+)\.(?P<minor>\d+)\.\d+")


@dataclass(frozen=True)
class Release:
    """One Kafka release the stack can run: its version and its major's needs."""

    version: str
    major: Major


def release(version: str, setting: str = VERSION_ENV) -> Release:
    """The release ``version`` names; a :class:`ConfigError` naming ``setting`` (where the
    version came from) when the stack cannot run it."""
    match = _VERSION.fullmatch(version)
    if match is None:
        raise ConfigError(
            f"{setting}={version!r} is not a Kafka version: give one like {DEFAULT_VERSION}"
        )
    major, minor = int(match["major"]), int(match["minor"])
    if major not in MAJORS or (major == 3 and minor < OLDEST_3):
        raise ConfigError(
            f"{setting}={version}: the local stack runs Kafka 3.{OLDEST_3} or later 3.x, "
            f"or 4.x (default {DEFAULT_VERSION})"
        )
    return Release(version, MAJORS[major])


def chosen(environ: Mapping[str, str]) -> str:
    """The version ``environ`` chooses (``PIPELINE_DEV_KAFKA``), else the default."""
    return environ.get(VERSION_ENV) or DEFAULT_VERSION
