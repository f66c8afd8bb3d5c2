"""The Kafka client factory: what it adds to a client (the connection, nothing else), and the
agent's clients named by the instance id. No broker: clients are built, never started."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import msgspec
import pytest
from aiokafka import ConsumerRebalanceListener, TopicPartition

from pipeline import kafka as kafka_io
from pipeline import kafka_clients
from pipeline.config import load_config
from pipeline.devstack import tls
from pipeline.errors import ConfigError
from pipeline.kafka_clients import KafkaSettings, kafka_settings, settings_from_env

ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka1:9092,kafka2:9092",
    "DATABASE_URL": "postgresql://ingest@db.example:5432/agents",
    "PIPELINE_INSTANCE_ID": "db-agent-7",
}


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        pass


def test_the_connection_is_the_servers_and_the_client_id() -> None:
    settings = KafkaSettings(bootstrap_servers="k1:9092,k2:9092", client_id="me")
    assert settings.connection() == {"bootstrap_servers": "k1:9092,k2:9092", "client_id": "me"}


def test_no_client_id_leaves_aiokafkas_default() -> None:
    assert KafkaSettings(bootstrap_servers="k:9092").connection() == {"bootstrap_servers": "k:9092"}


def test_bootstrap_servers_alone_make_settings() -> None:
    settings = KafkaSettings(bootstrap_servers="k:9092", client_id="me")
    assert kafka_settings(settings) is settings
    assert kafka_settings("k:9092") == KafkaSettings(bootstrap_servers="k:9092")


def test_settings_decode_strictly() -> None:
    assert msgspec.convert({"bootstrap_servers": "k:1"}, KafkaSettings) == KafkaSettings(
        bootstrap_servers="k:1"
    )
    with pytest.raises(msgspec.ValidationError, match="length >= 1"):
        msgspec.convert({"bootstrap_servers": ""}, KafkaSettings)
    with pytest.raises(msgspec.ValidationError, match="unknown field `ssl`"):
        msgspec.convert({"bootstrap_servers": "k:1", "ssl": True}, KafkaSettings)


@pytest.mark.parametrize(
    "keyword", ["bootstrap_servers", "client_id", "security_protocol", "sasl_plain_password"]
)
async def test_a_client_cannot_bring_its_own_connection(keyword: str) -> None:
    settings = KafkaSettings(bootstrap_servers="k:9092")
    for build in (kafka_clients.consumer, kafka_clients.producer, kafka_clients.admin):
        with pytest.raises(TypeError, match=f"^{keyword}: how to reach Kafka comes from"):
            build(settings, **{keyword: "x"})


async def test_clients_get_the_connection_and_their_own_settings() -> None:
    settings = KafkaSettings(bootstrap_servers="k:9092", client_id="me")
    producer = kafka_clients.producer(settings, acks="all", request_timeout_ms=1234)
    try:
        assert repr(producer.client) == "<AIOKafkaClient client_id=me>"
        assert producer.client.hosts == [("k", 9092, 0)]
        assert producer._request_timeout_ms == 1234
    finally:
        await producer.stop()


async def test_the_agents_consumer_is_named_by_the_instance_id() -> None:
    consumer = kafka_io.make_consumer(load_config(ENV), Listener())
    try:
        assert repr(consumer._client) == "<AIOKafkaClient client_id=db-agent-7>"
        assert sorted(consumer._client.hosts) == [("kafka1", 9092, 0), ("kafka2", 9092, 0)]
    finally:
        await kafka_io.stop_consumer(consumer)


# -- security: TLS and SASL ----------------------------------------------------------------------

SECRET = "hunter2-Very-Secret"


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return tls.ensure_ca(tmp_path / "ca").cert


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "kafka.password"
    path.write_text(SECRET + "\n")
    return path


def secure(ca: Path, password_file: Path, **changes: object) -> KafkaSettings:
    values: dict[str, object] = {
        "bootstrap_servers": "k:9094",
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(ca),
        "sasl_username": "pipeline-agent",
        "sasl_password_file": str(password_file),
        **changes,
    }
    return KafkaSettings(**values)  # type: ignore[arg-type]


def test_sasl_ssl_gives_aiokafka_the_protocol_the_user_and_a_verifying_context(
    ca: Path, password_file: Path
) -> None:
    connection = secure(ca, password_file).connection()
    context = connection.pop("ssl_context")
    assert connection == {
        "bootstrap_servers": "k:9094",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "pipeline-agent",
        "sasl_plain_password": SECRET,  # the file's line, without its newline
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", tls.CA_NAME),),)]


def test_ssl_without_a_ca_file_trusts_the_systems_cas() -> None:
    connection = KafkaSettings(bootstrap_servers="k:9093", security_protocol="SSL").connection()
    assert connection["security_protocol"] == "SSL"
    assert connection["ssl_context"].verify_mode is ssl.CERT_REQUIRED
    assert "sasl_plain_password" not in connection


async def test_every_client_gets_the_security_settings(ca: Path, password_file: Path) -> None:
    producer = kafka_clients.producer(secure(ca, password_file), acks="all")
    try:
        client = producer.client
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "pipeline-agent"
        assert client._ssl_context.check_hostname is True
    finally:
        await producer.stop()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param(
            {"sasl_username": ""},
            "PIPELINE_KAFKA_SASL_USERNAME is not set: "
            "PIPELINE_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs a user",
            id="sasl-without-user",
        ),
        pytest.param(
            {"sasl_password_file": ""},
            "PIPELINE_KAFKA_SASL_PASSWORD_FILE is not set: SASL_SSL needs the password of user "
            "'pipeline-agent' (or PIPELINE_KAFKA_SASL_PASSWORD)",
            id="sasl-without-password",
        ),
        pytest.param(
            {"sasl_password_file": "/nonexistent/kafka.password"},
            "PIPELINE_KAFKA_SASL_PASSWORD_FILE: cannot read /nonexistent/kafka.password: "
            "No such file or directory",
            id="password-file-missing",
        ),
        pytest.param(
            {"sasl_password": SECRET},
            "both PIPELINE_KAFKA_SASL_PASSWORD_FILE and PIPELINE_KAFKA_SASL_PASSWORD are set: "
            "set one",
            id="two-passwords",
        ),
        pytest.param(
            {"ssl_cafile": "/nonexistent/ca.crt"},
            "PIPELINE_KAFKA_SSL_CAFILE: /nonexistent/ca.crt does not exist or is not a file",
            id="ca-missing",
        ),
        pytest.param(
            {"security_protocol": "PLAINTEXT", "sasl_password_file": ""},
            "PIPELINE_KAFKA_SASL_USERNAME is set but PIPELINE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT "
            "does not authenticate with SASL: use SASL_SSL (or SASL_PLAINTEXT), or unset it",
            id="user-without-sasl",
        ),
        pytest.param(
            {"security_protocol": "SASL_PLAINTEXT"},
            "PIPELINE_KAFKA_SSL_CAFILE is set but "
            "PIPELINE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT does not use TLS",
            id="ca-without-tls",
        ),
    ],
)
def test_bad_security_settings_fail_naming_the_variable(
    ca: Path, password_file: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        secure(ca, password_file, **changes)
    assert str(raised.value).startswith(message), str(raised.value)
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "holds no PEM certificate", id="empty"),
        pytest.param(b"not a certificate\n", "holds no PEM certificate", id="text"),
    ],
)
def test_a_ca_file_that_is_not_a_certificate_fails(
    tmp_path: Path, password_file: Path, content: bytes, message: str
) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^PIPELINE_KAFKA_SSL_CAFILE: {bad} {message}"):
        secure(bad, password_file)


def test_an_empty_password_file_fails(ca: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"^PIPELINE_KAFKA_SASL_PASSWORD_FILE: {empty} is empty"):
        secure(ca, empty)


def test_the_password_never_shows(ca: Path, password_file: Path) -> None:
    inline = secure(ca, password_file, sasl_password_file="", sasl_password=SECRET)
    from_file = secure(ca, password_file)
    for settings in (inline, from_file):
        assert SECRET not in repr(settings)
        assert SECRET not in str(settings)
    assert "sasl_password='***'" in repr(inline)
    env = {
        **ENV,
        "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PIPELINE_KAFKA_SSL_CAFILE": str(ca),
        "PIPELINE_KAFKA_SASL_USERNAME": "pipeline-agent",
        "PIPELINE_KAFKA_SASL_PASSWORD": SECRET,
    }
    config = load_config(env)
    assert config.kafka.password() == SECRET
    assert SECRET not in repr(config)
    assert "sasl_password='***'" in repr(config)


def test_settings_come_from_the_environment(ca: Path, password_file: Path) -> None:
    settings = secure(ca, password_file)
    assert settings_from_env(settings.environment()) == settings
    assert settings.environment() == {
        "KAFKA_BOOTSTRAP_SERVERS": "k:9094",
        "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PIPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "PIPELINE_KAFKA_SSL_CAFILE": str(ca),
        "PIPELINE_KAFKA_SASL_USERNAME": "pipeline-agent",
        "PIPELINE_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        "PIPELINE_KAFKA_SASL_PASSWORD": "",
    }
    env = {**ENV, **settings.environment()}
    config = load_config(env)
    assert msgspec.structs.replace(config.kafka, client_id="") == settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PIPELINE_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("PIPELINE_KAFKA_SASL_MECHANISM", "GSSAPI"),
    ],
)
def test_an_unknown_protocol_or_mechanism_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}: Invalid enum value '{value}'.*; choose"):
        settings_from_env({"KAFKA_BOOTSTRAP_SERVERS": "k:1", variable: value})
    with pytest.raises(ConfigError, match=f"^{variable} "):
        load_config({**ENV, variable: value})


def test_bootstrap_servers_alone_carry_the_environments_security(
    monkeypatch: pytest.MonkeyPatch, ca: Path
) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("PIPELINE_KAFKA_SSL_CAFILE", str(ca))
    assert kafka_settings("k:9093") == KafkaSettings(
        bootstrap_servers="k:9093", security_protocol="SSL", ssl_cafile=str(ca)
    )


async def test_an_absent_broker_is_not_a_settings_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await kafka_clients.check_connection(
            KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), within=2
        )
