"""Configuration: environment over TOML, typos and bad values named, the password never shown."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.config import SETTINGS, Config, env_name, load_config, redact_url
from pipeline.errors import ConfigError
from pipeline.kafka_settings import KafkaSettings

PASSWORD = "s3cr3t-Pa55"
DATABASE_URL = f"postgresql://ingest:{PASSWORD}@db.example:5432/agents"
ENV = {"KAFKA_BOOTSTRAP_SERVERS": "kafka1:9092,kafka2:9092", "DATABASE_URL": DATABASE_URL}
HOST_PID = f"{socket.gethostname()}-{os.getpid()}"

DEFAULTS = {
    "kafka_bootstrap_servers": "kafka1:9092,kafka2:9092",
    "database_url": DATABASE_URL,
    "migrate_database_url": "",
    "group_id": "database-agent",
    "topic_prefix": "",
    "streams_file": "",
    "streams": ("states", "events", "metrics", "analytics", "config"),
    "retention": {},
    "topic_partitions": 6,
    "batch_max_records": 50_000,
    "batch_max_bytes": 32 * 1024 * 1024,
    "batch_max_wait_ms": 100,
    "fetch_max_bytes": 64 * 1024 * 1024,
    "session_timeout_ms": 30_000,
    "db_command_timeout_s": 60.0,
    "db_idle_in_transaction_timeout_s": 90.0,
    "db_pooler": "none",
    "on_gap": "record",
    "retry_max_backoff_s": 10.0,
    "shutdown_timeout_s": 30.0,
    "metrics_address": "127.0.0.1:9108",
    "lag_refresh_s": 5.0,
    "instance_id": HOST_PID,
    "control_public_keys": (),
    "control_private_key_file": "",
    "kafka_security_protocol": "PLAINTEXT",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_ssl_cafile": "",
    "kafka_sasl_username": "",
    "kafka_sasl_password_file": "",
    "kafka_sasl_password": "",
}


def as_dict(config: Config) -> dict[str, Any]:
    """The config as its settings (:data:`SETTINGS`): Config.kafka's fields by their flat
    names; its client id is the instance id."""
    values = msgspec.structs.asdict(config)
    kafka = msgspec.structs.asdict(values.pop("kafka"))
    assert kafka.pop("client_id") == config.instance_id
    return {**{f"kafka_{k}": v for k, v in kafka.items()}, **values}


def test_defaults_with_only_the_two_endpoints() -> None:
    assert as_dict(load_config(ENV)) == DEFAULTS


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_BATCH_MAX_RECORDS", "0")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "elsewhere:9092")
    assert as_dict(load_config(ENV)) == DEFAULTS


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        pytest.param("kafka_bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS", id="kafka"),
        pytest.param("database_url", "DATABASE_URL", id="database"),
        *(
            pytest.param(f, f"PIPELINE_{f.upper()}", id=f)
            for f in DEFAULTS
            if f not in ("kafka_bootstrap_servers", "database_url")
        ),
    ],
)
def test_every_field_has_its_environment_variable(field: str, variable: str) -> None:
    assert env_name(field) == variable


def test_the_name_table_covers_every_field() -> None:
    assert set(SETTINGS) == set(DEFAULTS)


def test_the_kafka_settings_are_one_field_not_copies() -> None:
    assert Config.__struct_fields__[0] == "kafka"
    assert [f for f in Config.__struct_fields__ if f.startswith("kafka")] == ["kafka"]
    assert type(load_config(ENV).kafka) is KafkaSettings


@pytest.mark.parametrize(
    ("variable", "text", "field", "value"),
    [
        pytest.param("PIPELINE_GROUP_ID", "ingest-eu", "group_id", "ingest-eu", id="str"),
        pytest.param("PIPELINE_TOPIC_PREFIX", "prod.", "topic_prefix", "prod.", id="prefix"),
        pytest.param("PIPELINE_BATCH_MAX_RECORDS", "1000", "batch_max_records", 1000, id="int"),
        pytest.param("PIPELINE_TOPIC_PARTITIONS", "1", "topic_partitions", 1, id="int-minimum"),
        pytest.param(
            "PIPELINE_DB_COMMAND_TIMEOUT_S", "2.5", "db_command_timeout_s", 2.5, id="float"
        ),
        pytest.param(
            "PIPELINE_RETRY_MAX_BACKOFF_S", "3", "retry_max_backoff_s", 3.0, id="float-from-int"
        ),
        pytest.param("PIPELINE_STREAMS", "metrics", "streams", ("metrics",), id="one-stream"),
        pytest.param(
            "PIPELINE_CONTROL_PUBLIC_KEYS",
            "/k/a.pub,/k/b.pub",
            "control_public_keys",
            ("/k/a.pub", "/k/b.pub"),
            id="public-keys",
        ),
        pytest.param(
            "PIPELINE_CONTROL_PRIVATE_KEY_FILE",
            "/k/antigravity.key",
            "control_private_key_file",
            "/k/antigravity.key",
            id="private-key",
        ),
        pytest.param(
            "PIPELINE_STREAMS", "config,states", "streams", ("config", "states"), id="streams"
        ),
        pytest.param(
            "PIPELINE_METRICS_ADDRESS", "0.0.0.0:9200", "metrics_address", "0.0.0.0:9200", id="addr"
        ),
        pytest.param("PIPELINE_METRICS_ADDRESS", "", "metrics_address", "", id="metrics-off"),
        pytest.param("PIPELINE_LAG_REFRESH_S", "1", "lag_refresh_s", 1.0, id="lag-refresh"),
        pytest.param("PIPELINE_INSTANCE_ID", "db-agent-3", "instance_id", "db-agent-3", id="id"),
        pytest.param(
            "KAFKA_BOOTSTRAP_SERVERS", "k:1", "kafka_bootstrap_servers", "k:1", id="kafka"
        ),
        pytest.param(
            "PIPELINE_KAFKA_SASL_MECHANISM",
            "PLAIN",
            "kafka_sasl_mechanism",
            "PLAIN",
            id="kafka-mechanism",
        ),
    ],
)
def test_environment_strings_become_typed_values(
    variable: str, text: str, field: str, value: Any
) -> None:
    config = load_config({**ENV, variable: text})
    assert as_dict(config) == {**DEFAULTS, field: value}
    assert type(as_dict(config)[field]) is type(value)


INVALID = [
    pytest.param(
        {"KAFKA_BOOTSTRAP_SERVERS": None}, "KAFKA_BOOTSTRAP_SERVERS", "missing", id="no-kafka"
    ),
    pytest.param({"DATABASE_URL": None}, "DATABASE_URL", "missing", id="no-database"),
    pytest.param(
        {"KAFKA_BOOTSTRAP_SERVERS": ""}, "KAFKA_BOOTSTRAP_SERVERS", "length >= 1", id="empty-kafka"
    ),
    pytest.param({"DATABASE_URL": ""}, "DATABASE_URL", "length >= 1", id="empty-database"),
    pytest.param({"PIPELINE_GROUP_ID": ""}, "PIPELINE_GROUP_ID", "length >= 1", id="empty-group"),
    pytest.param(
        {"PIPELINE_BATCH_MAX_RECORDS": "0"}, "PIPELINE_BATCH_MAX_RECORDS", ">= 1", id="zero"
    ),
    pytest.param(
        {"PIPELINE_BATCH_MAX_BYTES": "-1"}, "PIPELINE_BATCH_MAX_BYTES", ">= 1", id="negative"
    ),
    pytest.param(
        {"PIPELINE_BATCH_MAX_RECORDS": "many"},
        "PIPELINE_BATCH_MAX_RECORDS",
        "Expected `int`",
        id="not-an-int",
    ),
    pytest.param(
        {"PIPELINE_TOPIC_PARTITIONS": "2.5"},
        "PIPELINE_TOPIC_PARTITIONS",
        "Expected `int`",
        id="fraction-for-int",
    ),
    pytest.param(
        {"PIPELINE_SHUTDOWN_TIMEOUT_S": "0"}, "PIPELINE_SHUTDOWN_TIMEOUT_S", "> 0", id="zero-s"
    ),
    pytest.param(
        {"PIPELINE_LAG_REFRESH_S": "0"}, "PIPELINE_LAG_REFRESH_S", ">= 0.1", id="lag-refresh-zero"
    ),
    pytest.param(
        {"PIPELINE_LAG_REFRESH_S": "3600"},
        "PIPELINE_LAG_REFRESH_S",
        "<= 300",
        id="lag-refresh-hour",
    ),
    pytest.param(
        {"PIPELINE_LAG_REFRESH_S": "often"},
        "PIPELINE_LAG_REFRESH_S",
        "Expected `float`",
        id="lag-refresh-not-a-number",
    ),
    pytest.param(
        {"PIPELINE_SESSION_TIMEOUT_MS": "1000"},
        "PIPELINE_SESSION_TIMEOUT_MS",
        ">= 6000",
        id="session-below-the-broker-minimum",
    ),
    pytest.param(
        {"PIPELINE_DB_COMMAND_TIMEOUT_S": "soon"},
        "PIPELINE_DB_COMMAND_TIMEOUT_S",
        "Expected `float`",
        id="not-a-float",
    ),
    pytest.param(
        {"PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S": "0"},
        "PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S",
        "Expected `float` > 0",
        id="idle-in-transaction-not-positive",
    ),
    pytest.param(
        {"PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S": "1e9"},
        "PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S",
        "Expected `float` <= 86400",
        id="idle-in-transaction-past-a-day",
    ),
    pytest.param(
        {"PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S": "60"},
        "PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S",
        "(60) must be greater than PIPELINE_DB_COMMAND_TIMEOUT_S (60)",
        id="idle-in-transaction-not-above-the-command-timeout",
    ),
    pytest.param(
        {"PIPELINE_STREAMS": "states,bogus"}, "PIPELINE_STREAMS", "['bogus']", id="unknown-stream"
    ),
    pytest.param({"PIPELINE_STREAMS": ""}, "PIPELINE_STREAMS", "unknown stream", id="no-stream"),
    pytest.param(
        {"PIPELINE_METRICS_ADDRESS": "localhost"},
        "PIPELINE_METRICS_ADDRESS",
        "expected HOST:PORT",
        id="address-without-port",
    ),
    pytest.param(
        {"PIPELINE_METRICS_ADDRESS": "localhost:http"},
        "PIPELINE_METRICS_ADDRESS",
        "expected HOST:PORT",
        id="address-port-not-a-number",
    ),
    pytest.param(
        {"PIPELINE_METRICS_ADDRESS": "my host:9108"},
        "PIPELINE_METRICS_ADDRESS",
        "expected HOST:PORT",
        id="address-with-space",
    ),
    pytest.param(
        {"PIPELINE_KAFKA_SECURITY_PROTOCOL": "TLS"},
        "PIPELINE_KAFKA_SECURITY_PROTOCOL",
        "Invalid enum value 'TLS'",
        id="kafka-protocol-unknown",
    ),
    pytest.param(
        {"PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
        "PIPELINE_KAFKA_SASL_USERNAME",
        "SASL_SSL needs a user",
        id="kafka-sasl-without-a-user",
    ),
    pytest.param(
        {"PIPELINE_KAFKA_SASL_USERNAME": "u", "PIPELINE_KAFKA_SASL_PASSWORD": PASSWORD},
        "PIPELINE_KAFKA_SASL_USERNAME",
        "does not authenticate with SASL",
        id="kafka-user-without-sasl",
    ),
    pytest.param(
        {"PIPELINE_DB_POOLER": "pgbouncer"},
        "PIPELINE_DB_POOLER",
        "Invalid enum value 'pgbouncer'",
        id="pooler-unknown",
    ),
]


@pytest.mark.parametrize(("changes", "variable", "fragment"), INVALID)
def test_invalid_value_raises_config_error_naming_the_variable(
    changes: dict[str, str | None], variable: str, fragment: str
) -> None:
    environ = {**ENV, **changes}
    with pytest.raises(ConfigError) as caught:
        load_config({k: v for k, v in environ.items() if v is not None})
    message = str(caught.value)
    assert message.split(" ", 1)[0].removesuffix(":") == variable
    assert fragment in message
    assert PASSWORD not in message


def test_unknown_stream_message_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**ENV, "PIPELINE_STREAMS": "states,bogus"})
    assert str(caught.value) == (
        "PIPELINE_STREAMS: unknown stream(s) ['bogus']; "
        "choose from states, events, metrics, analytics, config"
    )


def test_a_bad_value_message_names_variable_and_field() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**ENV, "PIPELINE_BATCH_MAX_RECORDS": "0"})
    assert str(caught.value) == (
        "PIPELINE_BATCH_MAX_RECORDS (config field 'batch_max_records'): "
        "Expected `int` >= 1 - at `$.batch_max_records`"
    )


def test_a_bad_kafka_value_names_its_variable_and_setting_and_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**ENV, "PIPELINE_KAFKA_SASL_MECHANISM": "GSSAPI"})
    assert str(caught.value) == (
        "PIPELINE_KAFKA_SASL_MECHANISM (config field 'kafka_sasl_mechanism'): "
        "Invalid enum value 'GSSAPI' - at `$.kafka.sasl_mechanism`; "
        "choose from SCRAM-SHA-512, SCRAM-SHA-256, PLAIN"
    )


def test_missing_bootstrap_servers_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"DATABASE_URL": DATABASE_URL})
    assert str(caught.value) == (
        "KAFKA_BOOTSTRAP_SERVERS (config field 'kafka_bootstrap_servers'): "
        "Object missing required field `bootstrap_servers` - at `$.kafka`"
    )


# -- TOML ------------------------------------------------------------------------------------


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_toml_file_sets_typed_values(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'group_id = "from-toml"\n'
        "batch_max_records = 5\n"
        "db_command_timeout_s = 1.5\n"
        'streams = ["events", "metrics"]\n',
    )
    assert as_dict(load_config(ENV, path)) == {
        **DEFAULTS,
        "group_id": "from-toml",
        "batch_max_records": 5,
        "db_command_timeout_s": 1.5,
        "streams": ("events", "metrics"),
    }


def test_toml_may_hold_the_endpoints(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path, f'kafka_bootstrap_servers = "k:9092"\ndatabase_url = "{DATABASE_URL}"\n'
    )
    assert as_dict(load_config({}, path)) == {**DEFAULTS, "kafka_bootstrap_servers": "k:9092"}


def test_toml_sets_the_kafka_settings_by_their_flat_names(tmp_path: Path) -> None:
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    path = write_toml(
        tmp_path,
        'kafka_security_protocol = "SASL_PLAINTEXT"\n'
        'kafka_sasl_mechanism = "SCRAM-SHA-256"\n'
        'kafka_sasl_username = "pipeline-agent"\n'
        f'kafka_sasl_password_file = "{password_file}"\n',
    )
    config = load_config(ENV, path)
    assert as_dict(config) == {
        **DEFAULTS,
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "SCRAM-SHA-256",
        "kafka_sasl_username": "pipeline-agent",
        "kafka_sasl_password_file": str(password_file),
    }
    assert config.kafka.password() == PASSWORD
    assert PASSWORD not in repr(config)
    # The environment still wins, setting by setting.
    environ = {**ENV, "PIPELINE_KAFKA_SASL_USERNAME": "pipeline-producer"}
    assert load_config(environ, path).kafka.sasl_username == "pipeline-producer"


def test_environment_overrides_toml_field_by_field(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'group_id = "from-toml"\nbatch_max_records = 5\n')
    config = load_config({**ENV, "PIPELINE_BATCH_MAX_RECORDS": "9"}, path)
    assert (config.batch_max_records, config.group_id) == (9, "from-toml")


def test_explicit_overrides_win_and_none_means_not_given(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'group_id = "from-toml"\nbatch_max_records = 5\n')
    config = load_config(
        {**ENV, "PIPELINE_BATCH_MAX_RECORDS": "9"},
        path,
        batch_max_records=11,
        group_id=None,
    )
    assert (config.batch_max_records, config.group_id) == (11, "from-toml")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param(
            "batch_max_recrods = 5\n",
            ("batch_max_recrods", "unknown field"),
            id="typo-in-key",
        ),
        pytest.param(
            '[kafka]\nbootstrap = "k:9092"\n',
            ("kafka", "unknown field"),
            id="unknown-table",
        ),
        pytest.param(
            'batch_max_records = "lots"\n',
            ("PIPELINE_BATCH_MAX_RECORDS", "batch_max_records", "Expected `int`"),
            id="wrong-type",
        ),
        pytest.param(
            'streams = ["states", "nope"]\n',
            ("PIPELINE_STREAMS", "['nope']"),
            id="unknown-stream",
        ),
    ],
)
def test_bad_toml_content_fails_naming_the_key(
    tmp_path: Path, text: str, fragments: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ENV, write_toml(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_unknown_toml_key_message_is_exact(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ENV, write_toml(tmp_path, "batch_max_recrods = 5\n"))
    assert str(caught.value).endswith("Object contains unknown field `batch_max_recrods`")


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "batch_max_records = = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(ENV, path)
    assert str(caught.value).startswith(f"config file {path}: ")


def test_missing_toml_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(ENV, path)
    assert str(caught.value) == f"config file {path} does not exist"


# -- the password never shows ----------------------------------------------------------------


def test_repr_and_str_hide_the_database_password() -> None:
    config = load_config(ENV)
    for text in (repr(config), str(config), f"{config!r}", f"{config}", repr([config])):
        assert PASSWORD not in text
        assert "database_url='postgresql://ingest:***@db.example:5432/agents'" in text
    assert config.database_url == DATABASE_URL  # the real value is still there to connect


def test_repr_lists_every_field_in_order() -> None:
    text = repr(load_config(ENV))
    assert text.startswith(
        "Config(kafka=KafkaSettings(bootstrap_servers='kafka1:9092,kafka2:9092', "
        f"client_id='{HOST_PID}', "
    )
    positions = [text.index(f" {field}=") for field in Config.__struct_fields__[1:]]
    assert positions == sorted(positions)


def test_repr_hides_the_kafka_password() -> None:
    config = load_config(
        {
            **ENV,
            "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "PIPELINE_KAFKA_SASL_USERNAME": "pipeline-agent",
            "PIPELINE_KAFKA_SASL_PASSWORD": PASSWORD,
        }
    )
    assert config.kafka.password() == PASSWORD
    for text in (repr(config), str(config), repr(config.kafka)):
        assert PASSWORD not in text
        assert "sasl_password='***'" in text


def test_repr_hides_a_password_given_as_query_parameter() -> None:
    # asyncpg and libpq both take the password from the query string too.
    url = "postgresql://ingest@db.example:5432/agents?sslmode=require&password=" + PASSWORD
    assert PASSWORD not in repr(load_config({**ENV, "DATABASE_URL": url}))


def test_repr_hides_the_migrators_password_and_migrate_falls_back_to_database_url() -> None:
    migrator = f"postgresql://owner:{PASSWORD}@db.example:5432/agents"
    config = load_config({**ENV, "PIPELINE_MIGRATE_DATABASE_URL": migrator})
    assert PASSWORD not in repr(config)
    assert "migrate_database_url='postgresql://owner:***@db.example:5432/agents'" in repr(config)
    assert config.migration_url == migrator
    assert load_config(ENV).migration_url == DATABASE_URL


def test_config_is_frozen() -> None:
    config = load_config(ENV)
    with pytest.raises(AttributeError):
        config.batch_max_records = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("prefix", "topic"),
    [
        pytest.param("", "agents.states", id="no-prefix"),
        pytest.param("staging.", "staging.agents.states", id="prefix"),
    ],
)
def test_topic_names_take_the_prefix(prefix: str, topic: str) -> None:
    config = load_config({**ENV, "PIPELINE_TOPIC_PREFIX": prefix})
    assert config.topic("agents.states") == topic


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param(ENV, id="unset"),
        pytest.param({**ENV, "PIPELINE_INSTANCE_ID": ""}, id="empty"),
    ],
)
def test_an_unnamed_instance_is_named_after_its_host_and_pid(environ: dict[str, str]) -> None:
    assert load_config(environ).instance_id == HOST_PID


def test_an_empty_instance_id_in_the_file_is_named_too(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('instance_id = ""\n')
    assert load_config(ENV, path).instance_id == HOST_PID


def test_a_given_instance_id_is_kept() -> None:
    assert load_config({**ENV, "PIPELINE_INSTANCE_ID": "db-agent-3"}).instance_id == "db-agent-3"
    assert load_config(ENV, instance_id="db-agent-4").instance_id == "db-agent-4"


def test_kafka_settings_carry_the_instance_id_as_client_id() -> None:
    assert load_config({**ENV, "PIPELINE_INSTANCE_ID": "db-agent-3"}).kafka == KafkaSettings(
        bootstrap_servers="kafka1:9092,kafka2:9092", client_id="db-agent-3"
    )
    assert load_config(ENV).kafka.client_id == HOST_PID


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("postgresql://u:pw@h/db", "postgresql://u:***@h/db", id="user-and-password"),
        pytest.param("postgresql://u@h/db", "postgresql://u@h/db", id="user-only"),
        pytest.param("postgresql://h/db", "postgresql://h/db", id="no-userinfo"),
        pytest.param("postgresql:///db?host=/run/pg", "postgresql:///db?host=/run/pg", id="socket"),
        pytest.param("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db", id="with-port"),
        pytest.param(
            "postgresql://u:pw@h:5432/db?sslmode=require&application_name=x",
            "postgresql://u:***@h:5432/db?sslmode=require&application_name=x",
            id="with-query",
        ),
        pytest.param("postgresql://u:@h/db", "postgresql://u:***@h/db", id="empty-password"),
        pytest.param("postgresql://:pw@h/db", "postgresql://:***@h/db", id="no-user"),
        pytest.param(
            "postgresql://u:p@ss:w@h/db", "postgresql://u:***@h/db", id="password-with-@-and-:"
        ),
        pytest.param("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db", id="percent-encoded"),
        pytest.param(
            "postgresql://u:pw@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db", id="ipv6"
        ),
        pytest.param(
            "postgresql://u:pw@h1:5432,h2:5433/db",
            "postgresql://u:***@h1:5432,h2:5433/db",
            id="several-hosts",
        ),
        pytest.param("postgres://u:pw@h/db", "postgres://u:***@h/db", id="postgres-scheme"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
