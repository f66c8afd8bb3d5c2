"""Which Kafka release the local stack runs, and what it generates per release: the POM that
resolves its jars, its broker settings, its logging. No broker, no Maven."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.devstack import kafka
from pipeline.devstack.kafka import _server_properties, check_data_version, data_version, pom
from pipeline.devstack.kafka_versions import (
    DEFAULT_VERSION,
    MAJORS,
    VERSION_ENV,
    chosen,
    release,
)
from pipeline.errors import ConfigError, DevStackError

MAVEN = "{http://maven.apache.org/POM/4.0.0}"


def dependencies(text: str) -> list[tuple[str, str, str]]:
    root = ET.fromstring(text)
    return [
        tuple(d.findtext(f"{MAVEN}{f}") or "" for f in ("groupId", "artifactId", "version"))  # type: ignore[misc]
        for d in root.iter(f"{MAVEN}dependency")
    ]


def properties(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    found = dict(line.split("=", 1) for line in lines)
    assert len(found) == len(lines), "a key is set twice"
    return found


@pytest.mark.parametrize(
    ("environ", "version"),
    [
        ({}, "4.3.1"),
        ({VERSION_ENV: ""}, "4.3.1"),  # exported but empty: unset
        ({VERSION_ENV: "3.9.1"}, "3.9.1"),
    ],
)
def test_the_environment_chooses_the_release_else_the_default(
    environ: dict[str, str], version: str
) -> None:
    assert DEFAULT_VERSION == "4.3.1"
    assert chosen(environ) == version


@pytest.mark.parametrize(("version", "major"), [("3.7.2", 3), ("3.9.1", 3), ("4.3.1", 4)])
def test_a_supported_release_gets_its_majors_needs(version: str, major: int) -> None:
    found = release(version)
    assert found.version == version
    assert found.major is MAJORS[major]


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("latest", "PIPELINE_DEV_KAFKA='latest' is not a Kafka version: give one like 4.3.1"),
        ("4.3", "PIPELINE_DEV_KAFKA='4.3' is not a Kafka version: give one like 4.3.1"),
        (" 4.3.1", "PIPELINE_DEV_KAFKA=' 4.3.1' is not a Kafka version: give one like 4.3.1"),
        (
            "3.6.2",
            "PIPELINE_DEV_KAFKA=3.6.2: the local stack runs Kafka 3.7 or later 3.x, or 4.x "
            "(default 4.3.1)",
        ),
        (
            "2.8.2",
            "PIPELINE_DEV_KAFKA=2.8.2: the local stack runs Kafka 3.7 or later 3.x, or 4.x "
            "(default 4.3.1)",
        ),
        (
            "5.0.0",
            "PIPELINE_DEV_KAFKA=5.0.0: the local stack runs Kafka 3.7 or later 3.x, or 4.x "
            "(default 4.3.1)",
        ),
    ],
)
def test_a_release_the_stack_cannot_run_is_refused_naming_the_setting(
    version: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        release(version)
    assert str(raised.value) == message


def test_the_flag_is_named_when_the_version_came_from_it() -> None:
    with pytest.raises(ConfigError, match=r"^--kafka=3\.6\.2: "):
        release("3.6.2", "--kafka")


def test_kafka_4_resolves_the_broker_with_log4j2() -> None:
    assert dependencies(pom(release("4.3.1"))) == [
        ("org.apache.kafka", "kafka_2.13", "4.3.1"),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.25.4"),
        ("org.apache.logging.log4j", "log4j-api", "2.25.4"),
        ("org.apache.logging.log4j", "log4j-core", "2.25.4"),
    ]


def test_kafka_3_resolves_the_broker_with_reload4j() -> None:
    assert dependencies(pom(release("3.9.1"))) == [
        ("org.apache.kafka", "kafka_2.13", "3.9.1"),
        ("org.slf4j", "slf4j-reload4j", "1.7.36"),
        ("ch.qos.reload4j", "reload4j", "1.2.25"),
    ]


def test_the_pom_names_its_release_as_its_own_version() -> None:
    root = ET.fromstring(pom(release("3.7.2")))
    assert root.findtext(f"{MAVEN}version") == "3.7.2"
    assert root.findtext(f"{MAVEN}packaging") == "pom"


def test_each_major_configures_its_own_logging_backend() -> None:
    three, four = MAJORS[3], MAJORS[4]
    assert three.log_config_name == "log4j.properties"
    assert three.log_option.format(path="/h/log4j.properties") == (
        "-Dlog4j.configuration=file:/h/log4j.properties"
    )
    assert properties(three.log_config)["log4j.rootLogger"] == "WARN, stdout"
    assert properties(three.log_config)["log4j.logger.kafka.server.KafkaRaftServer"] == "INFO"
    assert four.log_config_name == "log4j2.yaml"
    assert four.log_option.format(path="/h/log4j2.yaml") == (
        "-Dlog4j2.configurationFile=/h/log4j2.yaml"
    )
    assert "kafka.server.KafkaRaftServer" in four.log_config


def test_the_majors_broker_settings_differ_only_in_the_share_coordinators_topic(
    tmp_path: Path,
) -> None:
    three = properties(_server_properties(release("3.9.1"), tmp_path, 19092, 19093))
    four = properties(_server_properties(release("4.3.1"), tmp_path, 19092, 19093))
    share = {
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
    }
    assert {k: v for k, v in four.items() if k not in three} == share
    assert {k: v for k, v in three.items() if k not in four} == {}
    assert {k: v for k, v in four.items() if k not in share} == three
    # The same static KRaft quorum on both: 3.9's dynamic quorum is not used.
    assert three["controller.quorum.voters"] == "1@127.0.0.1:19093"


# -- the release a stack home's data belongs to --------------------------------------------


def formatted(home: Path, recorded: str | None) -> Path:
    """A broker home whose data was formatted (meta.properties), with ``recorded`` as the
    release that did it (None: a home from before the stack recorded it)."""
    (home / "data").mkdir(parents=True)
    (home / "data" / "meta.properties").write_text("node.id=1\n")
    if recorded is not None:
        (home / kafka.VERSION_FILE).write_text(f"{recorded}\n")
    return home


def test_a_home_without_data_belongs_to_no_release(tmp_path: Path) -> None:
    assert data_version(tmp_path) is None
    # A record without data (a format that failed) does not count either.
    (tmp_path / kafka.VERSION_FILE).write_text("3.9.1\n")
    assert data_version(tmp_path) is None
    check_data_version(tmp_path, "4.3.1")


def test_a_home_formatted_before_the_record_is_4_3_1s(tmp_path: Path) -> None:
    assert data_version(formatted(tmp_path, None)) == "4.3.1"


def test_data_of_the_same_release_is_run(tmp_path: Path) -> None:
    home = formatted(tmp_path, "3.9.1")
    assert data_version(home) == "3.9.1"
    check_data_version(home, "3.9.1")


def test_data_of_another_release_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    home = formatted(tmp_path, "3.9.1")
    with pytest.raises(DevStackError) as raised:
        check_data_version(home, "4.3.1")
    assert str(raised.value) == (
        f"the Kafka data in {home / 'data'} was formatted by Kafka 3.9.1, but this `up` would "
        "run Kafka 4.3.1. Run Kafka 3.9.1 (PIPELINE_DEV_KAFKA=3.9.1, or `pipeline dev up "
        "--kafka 3.9.1`), or remove the data with `pipeline dev down --purge` (it is lost), "
        "or use another PIPELINE_DEV_HOME for Kafka 4.3.1."
    )
