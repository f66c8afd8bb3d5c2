"""The local stack's Kafka security, without a broker: who may do what (the ACL list), the
SASL_SSL listener's broker settings, and the users' password files."""

from __future__ import annotations

import stat
from pathlib import Path

from pipeline.devstack import tls
from pipeline.devstack.kafka import SecureListener, _server_properties
from pipeline.devstack.kafka_auth import (
    Acl,
    Operation,
    Permission,
    Resource,
    ensure_password_file,
    password_file,
    pipeline_acls,
)
from pipeline.devstack.kafka_versions import DEFAULT_VERSION, release

DEFAULT = release(DEFAULT_VERSION)

DATA = ["p.agents.states", "p.agents.events", "p.agents.metrics", "p.users.analytics"]
DATA += ["p.system.config"]
CONTROL, STATUS, DLQ = "p.antigravity.control", "p.antigravity.status", "p.pipeline.dlq"


def allowed(acls: list[Acl], principal: str) -> set[tuple[str, str, str]]:
    return {
        (a.resource.name, a.name, a.operation.name)
        for a in acls
        if a.principal == principal and a.permission is Permission.ALLOW
    }


def test_agents_read_data_and_control_write_dlq_and_status_and_join_their_group() -> None:
    acls = pipeline_acls("p.", "g")
    assert allowed(acls, "User:pipeline-agent") == {
        *(("TOPIC", t, "READ") for t in [*DATA, CONTROL]),
        ("TOPIC", DLQ, "WRITE"),
        ("TOPIC", DLQ, "DESCRIBE_CONFIGS"),  # the limit its dead letters are sized to
        ("TOPIC", STATUS, "WRITE"),
        ("GROUP", "g", "READ"),
    }
    denied = [a for a in acls if a.permission is Permission.DENY]
    assert denied == [
        Acl("User:pipeline-agent", Resource.TOPIC, CONTROL, Operation.WRITE, Permission.DENY)
    ]


def test_only_the_orchestrator_writes_the_control_topic() -> None:
    acls = pipeline_acls("p.", "g")
    writers = {
        a.principal
        for a in acls
        if a.name == CONTROL and a.operation is Operation.WRITE and a.permission is Permission.ALLOW
    }
    assert writers == {"User:antigravity"}
    assert allowed(acls, "User:antigravity") >= {
        ("TOPIC", CONTROL, "WRITE"),
        ("TOPIC", CONTROL, "READ"),
        ("TOPIC", STATUS, "READ"),
        # `pipeline topics create` brings an existing status topic to its retention.
        ("TOPIC", STATUS, "DESCRIBE_CONFIGS"),
        ("TOPIC", STATUS, "ALTER_CONFIGS"),
    }


def test_the_fleet_writes_the_data_topics_and_nothing_else() -> None:
    assert allowed(pipeline_acls("p.", "g"), "User:pipeline-producer") == {
        ("TOPIC", t, "WRITE") for t in DATA
    }


def test_the_default_acls_name_the_default_topics_and_group() -> None:
    names = {a.name for a in pipeline_acls()}
    assert {"agents.metrics", "antigravity.control", "pipeline.dlq", "database-agent"} <= names
    assert Acl("User:pipeline-agent", Resource.GROUP, "database-agent", Operation.READ).line() == (
        "allow User:pipeline-agent READ on GROUP database-agent"
    )


def test_password_files_are_random_private_and_kept(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    first = ensure_password_file(secrets, "pipeline-agent")
    assert (
        first
        == password_file(secrets, "pipeline-agent")
        == secrets / "kafka-pipeline-agent.password"
    )
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    password = first.read_text()
    assert len(password.strip()) >= 40 and password.endswith("\n")
    assert ensure_password_file(secrets, "pipeline-agent").read_text() == password
    assert ensure_password_file(secrets, "antigravity").read_text() != password


def test_the_secure_listener_is_sasl_ssl_with_scram_and_the_authorizer(tmp_path: Path) -> None:
    ca = tls.ensure_ca(tmp_path / "tls")
    cert = tls.issue_server_cert(ca, tmp_path / "tls", "kafka")
    secure = SecureListener(19094, cert.cert, cert.key)
    text = _server_properties(DEFAULT, tmp_path / "data", 19092, 19093, secure)
    props = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,SASL_SSL://127.0.0.1:19094,CONTROLLER://127.0.0.1:19093"
    )
    assert props["advertised.listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,SASL_SSL://127.0.0.1:19094"
    )
    assert props["listener.security.protocol.map"] == (
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL"
    )
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["ssl.keystore.type"] == "PEM"
    # The PEM blocks, one properties line each: Java's loader turns the \n escapes back.
    key = props["ssl.keystore.key"].replace("\\n", "\n")
    assert key == cert.key.read_text().strip()
    assert props["ssl.keystore.certificate.chain"].replace("\\n", "\n") == (
        cert.cert.read_text().strip()
    )
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["super.users"] == "User:ANONYMOUS"
    assert props["allow.everyone.if.no.acl.found"] == "false"
