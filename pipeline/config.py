"""DatabaseAgent configuration: environment variables over an optional TOML file.

Every field has an environment variable (``PIPELINE_`` + the field name in upper case, except
the two endpoints, which use the names every tool knows). A typo in the TOML file or a value
of the wrong type fails at start-up with the field named. The database URL may hold a
password: it is only ever shown through :func:`redact_url`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from pipeline import db
from pipeline.errors import ConfigError
from pipeline.kafka_clients import KafkaSettings, SaslMechanism, SecurityProtocol
from pipeline.records import STREAM_BY_NAME, STREAMS, topic_name

Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]

_LISTS = {"streams", "control_public_keys"}  # comma-separated in the environment
_ENV_NAMES = {"kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS", "database_url": "DATABASE_URL"}


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings of one DatabaseAgent process."""

    kafka_bootstrap_servers: Annotated[str, msgspec.Meta(min_length=1)]
    database_url: Annotated[str, msgspec.Meta(min_length=1)]
    # `pipeline migrate`'s login, the schema's owner (docs/security.md); "" means database_url.
    migrate_database_url: str = ""
    group_id: Annotated[str, msgspec.Meta(min_length=1)] = "database-agent"
    topic_prefix: str = ""
    streams: tuple[str, ...] = tuple(s.name for s in STREAMS)
    topic_partitions: Positive = 6
    batch_max_records: Positive = 50_000
    batch_max_bytes: Positive = 32 * 1024 * 1024
    batch_max_wait_ms: Positive = 100
    fetch_max_bytes: Positive = 64 * 1024 * 1024
    session_timeout_ms: Annotated[int, msgspec.Meta(ge=6000)] = 30_000
    db_command_timeout_s: Seconds = 60.0
    # PostgreSQL ends an agent's session whose transaction sat idle this long (a process
    # stopped inside its ingest transaction), freeing its offset rows. Longer than anything
    # the agent waits on inside a transaction: db_command_timeout_s bounds the longest, the
    # DLQ acknowledgements. At most a day (the server's limit is about 24 days, in ms).
    db_idle_in_transaction_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 90.0
    # What stands between the pipeline and PostgreSQL: "none" (a direct connection) or
    # "session" work alike; "transaction", a pooler in transaction mode, turns off the
    # cache of prepared statements (docs/compatibility.md).
    db_pooler: db.Pooler = "none"
    retry_max_backoff_s: Seconds = 10.0
    shutdown_timeout_s: Seconds = 30.0
    metrics_address: str = "127.0.0.1:9108"
    # How often lag (records and seconds) is measured, even while idle, paused or retrying.
    lag_refresh_s: Annotated[float, msgspec.Meta(ge=0.1, le=300)] = 5.0
    # This instance's name and its Kafka client id; load_config resolves "" to host-pid.
    instance_id: str = ""
    # Public key files (PEM) whose signatures the agent accepts on control commands; without
    # any, it refuses every command it would have to decide.
    control_public_keys: tuple[str, ...] = ()
    # The orchestrator's signing key (`pipeline control`), PEM, readable by its owner only.
    control_private_key_file: str = ""
    # How Kafka's clients authenticate and encrypt: pipeline.kafka_clients.KafkaSettings's
    # security settings, each PIPELINE_KAFKA_<NAME>.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    kafka_ssl_cafile: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password_file: str = ""
    kafka_sasl_password: str = ""  # never shown; prefer the file

    def __post_init__(self) -> None:
        unknown = [s for s in self.streams if s not in STREAM_BY_NAME]
        if unknown or not self.streams:
            raise ConfigError(
                f"{env_name('streams')}: unknown stream(s) {unknown or '(none given)'}; "
                f"choose from {', '.join(STREAM_BY_NAME)}"
            )
        if self.metrics_address and not re.fullmatch(r"[^\s:]+:\d{1,5}", self.metrics_address):
            raise ConfigError(
                f"{env_name('metrics_address')}: expected HOST:PORT (or empty to disable), "
                f"got {self.metrics_address!r}"
            )
        if self.db_idle_in_transaction_timeout_s <= self.db_command_timeout_s:
            raise ConfigError(
                f"{env_name('db_idle_in_transaction_timeout_s')} "
                f"({self.db_idle_in_transaction_timeout_s:g}) must be greater than "
                f"{env_name('db_command_timeout_s')} ({self.db_command_timeout_s:g}): inside "
                "its ingest transaction the agent waits up to that long for the DLQ's "
                "acknowledgements, and PostgreSQL would end the session meanwhile"
            )
        self.kafka  # noqa: B018 - the Kafka settings are checked together, at start-up

    def __repr__(self) -> str:  # never show the password, whatever prints this
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields["database_url"] = redact_url(self.database_url)
        if self.kafka_sasl_password:
            fields["kafka_sasl_password"] = "***"
        fields["migrate_database_url"] = redact_url(self.migrate_database_url)
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def topic(self, default_name: str) -> str:
        """A topic's deployed name: :func:`pipeline.records.topic_name` with this prefix."""
        return topic_name(default_name, self.topic_prefix)

    @property
    def migration_url(self) -> str:
        """Where `pipeline migrate` connects: the migrator's URL, else the agents'."""
        return self.migrate_database_url or self.database_url

    @property
    def db_session(self) -> db.Session:
        """How this process's database connections are set up."""
        return db.Session(
            command_timeout=self.db_command_timeout_s,
            pooler=self.db_pooler,
            idle_in_transaction_timeout=self.db_idle_in_transaction_timeout_s,
        )

    @property
    def kafka(self) -> KafkaSettings:
        """How this instance's Kafka clients connect; the instance id is their client id."""
        return KafkaSettings(
            bootstrap_servers=self.kafka_bootstrap_servers,
            client_id=self.instance_id,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            ssl_cafile=self.kafka_ssl_cafile,
            sasl_username=self.kafka_sasl_username,
            sasl_password_file=self.kafka_sasl_password_file,
            sasl_password=self.kafka_sasl_password,
        )


def env_name(field: str) -> str:
    return _ENV_NAMES.get(field, f"PIPELINE_{field.upper()}")


def load_config(
    environ: Mapping[str, str] = os.environ,
    toml_path: Path | None = None,
    **overrides: Any,
) -> Config:
    """Build the config: TOML file, then environment variables, then explicit overrides.

    An empty or unset ``instance_id`` becomes :func:`default_instance_id` (host-pid), so
    every process has a name, in its logs and as its Kafka client id.
    """
    values: dict[str, Any] = {}
    if toml_path is not None:
        try:
            values.update(msgspec.toml.decode(toml_path.read_bytes()))
        except FileNotFoundError:
            raise ConfigError(f"config file {toml_path} does not exist") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"config file {toml_path}: {exc}") from None
    for field in Config.__struct_fields__:
        raw = environ.get(env_name(field))
        if raw is not None:
            values[field] = [s for s in raw.split(",") if s] if field in _LISTS else raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("instance_id") in (None, ""):
        values["instance_id"] = default_instance_id()
    try:
        return msgspec.convert(values, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_field(str(exc))) from None


def default_instance_id() -> str:
    """``PIPELINE_INSTANCE_ID``'s default: this host's name and this process's pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _name_the_field(message: str) -> str:
    # msgspec says "Expected `int` >= 1 - at `$.batch_max_records`"; users set environment
    # variables, so name the variable too.
    unknown = re.search(r"unknown field `(\w+)`", message)
    if unknown is not None:
        return f"unknown setting {unknown.group(1)!r} in the config file: {message}"
    match = re.search(r"`\$\.(\w+)", message) or re.search(r"field `(\w+)`", message)
    if match is None:
        return f"configuration: {message}"
    field = match.group(1)
    return f"{env_name(field)} (config field {field!r}): {message}"


_SECRET_PARAMS = {"password", "sslpassword"}


def redact_url(url: str) -> str:
    """The URL with its passwords (in the user info or the query) shown as ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable: show nothing that could be a secret
        return url.split(":", 1)[0] + "://***"
    netloc = parts.netloc
    if password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + ":***@" + host
    query = "&".join(
        f"{name}=***" if name.lower() in _SECRET_PARAMS else pair
        for pair in parts.query.split("&")
        if pair
        for name in (pair.split("=", 1)[0],)
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret; urlunsplit would also drop an empty "//" authority
    return urlunsplit(parts._replace(netloc=netloc, query=query))
